"""Methods are plug-ins: OneActor end to end through the CLI, and a method registered in a
test runs through tune, evaluate, the refresh and export with nothing else changed."""

import json

import safetensors.torch
import torch
import yaml

from flows.cli import main
from flows.refresh import catalog_refresh
from subjectflow.catalog.schemas import ADAPTERS
from subjectflow.methods import registry
from subjectflow.methods.base import Method
from subjectflow.training.artefacts import adapter_id, record_trained
from subjectflow.training.sampling import generate_with_loras, subject_prompt
from tests.flows.test_refresh_flow import REFRESH
from tests.training.conftest import ingested_catalog, tiny_config

ONEACTOR = {"steps": 4, "aux_images": 3, "cluster_steps": 3}


def _cli(catalog, config, *args):
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return main([*args, "--catalog", str(catalog.root)])


def test_oneactor_tunes_generates_evaluates_and_exports_through_the_cli(tmp_path, capfd, caplog):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    config = tiny_config(oneactor=ONEACTOR, evaluate={"prompts": 1, "images_per_prompt": 2, "methods": ["oneactor"]})
    cli = lambda *args: _cli(catalog, config, *args)  # noqa: E731

    assert cli("tune", "--method", "oneactor", "--subject", "vase", "--steps", "3") == 0
    out = capfd.readouterr().out
    assert "--steps 3 sets oneactor.steps" in out and "made vase cluster" in out
    adapters = catalog.read("adapters").to_pylist()
    assert [(a["method"], a["subject_id"], a["steps"]) for a in adapters] == [("oneactor", "vase", 3)]
    config = tiny_config(oneactor={**ONEACTOR, "steps": 3}, evaluate=config.evaluate.model_dump())
    assert catalog.read("clusters").to_pylist()[0]["class_name"] == "vase"
    assert cli("generate", "--method", "oneactor", "--subject", "vase", "--n", "1") == 0
    assert cli("evaluate") == 0
    assert "evaluate vase/oneactor 1/1 prompts" in caplog.text  # progress without a terminal, in the run's logs
    metrics = catalog.read("metrics").to_pylist()
    assert metrics and {m["method"] for m in metrics} == {"oneactor"}
    assert cli("export", "--method", "oneactor", "--subject", "vase", "--out", str(tmp_path / "export")) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["method"] == "oneactor" and manifest["weights"][0]["file"] == "oneactor.safetensors"
    weights = safetensors.torch.load_file(tmp_path / "export" / "oneactor.safetensors")
    assert "cluster.target" in weights and "cluster.auxiliary" in weights
    capfd.readouterr()
    assert cli("methods") == 0
    assert "oneactor" in capfd.readouterr().out


class Toy(Method):
    """The base model under its own name, after an SFT adapter it needs: what a new method
    declares, and nothing else in subjectflow knows about it."""

    name = "toy"
    summary = "a test method"
    needs = ("sft",)
    sections = ("generate",)

    def artefact_id(self, ctx, subject, needs):
        return adapter_id({"method": self.name, "base": ctx.base, "parent": needs["sft"]}, subject)

    def train(self, ctx, subject, needs, stop_after=None):
        key = self.artefact_id(ctx, subject, {"sft": needs["sft"]["adapter_id"]})
        row = {"adapter_id": key, "subject_id": subject.subject_id, "method": self.name, "base_model": ctx.base,
               "parent_adapter_id": needs["sft"]["adapter_id"], "params": "{}", "inputs_hash": subject.inputs_hash,
               "steps": 1, "final_loss": 0.0}
        return record_trained(ctx.catalog, ADAPTERS, "adapters", row, [{"step": 1, "loss": 0.0}],
                              safetensors.torch.save({"weight": torch.zeros(1)}))

    def sample(self, ctx, subject, artefacts, prompt, n, references=None):
        text = subject_prompt(prompt, subject, subject.class_name)
        return generate_with_loras(ctx.catalog, ctx.config, ctx.parts, ctx.base, text, n, subject, [], self.name,
                                   artefacts[self.name]["adapter_id"])


def test_a_method_registered_in_a_test_runs_through_the_refresh_evaluation_and_export(tmp_path, capfd):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    refresh = {**REFRESH, "evaluate": {"prompts": 1, "images_per_prompt": 2, "methods": ["toy"]}}
    config = tiny_config(**refresh)
    with registry.registered(Toy()):
        run = catalog_refresh(str(catalog.root), str(tmp_path / "src"), config, str(tmp_path / "site"))
        assert run.record.status == "completed", run.summary()
        assert sorted(a["method"] for a in catalog.read("adapters").to_pylist()) == ["sft", "toy"]
        assert {m["method"] for m in catalog.read("metrics").to_pylist()} == {"toy"}
        assert "toy" in (tmp_path / "site" / "index.html").read_text()
        again = catalog_refresh(str(catalog.root), str(tmp_path / "src"), config, str(tmp_path / "site"))
        assert again.record.ran == [] and again.record.status == "completed"

        assert _cli(catalog, config, "export", "--method", "toy", "--subject", "vase", "--out",
                    str(tmp_path / "out")) == 0
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert [w["method"] for w in manifest["weights"]] == ["toy"]
        capfd.readouterr()
        assert _cli(catalog, config, "methods") == 0
        listed = capfd.readouterr().out
        assert "toy" in listed and "needs sft" in listed
    assert "toy" not in registry.names()
