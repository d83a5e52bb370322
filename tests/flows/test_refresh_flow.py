"""The nightly refresh end to end on the tiny model: everything, then nothing, then one photo."""

import json
import shutil

import yaml
from prefect.client.orchestration import get_client

from flows.cli import main
from flows.refresh import catalog_refresh
from subjectflow.catalog import init_catalog, list_versions
from subjectflow.catalog.layout import WORK_DIR
from tests.photos import photo_set
from tests.training.conftest import tiny_config

REFRESH = {"jointsets": {"resolution": 32, "sets_per_subject": 2}, "joint": {"steps": 2},
           "evaluate": {"prompts": 2, "images_per_prompt": 2}, "versioning": {"push": False}}


def setup(tmp_path, subjects=("red_mug", "blue_box")):
    config = tiny_config(**REFRESH)
    catalog = init_catalog(tmp_path / "catalog", config)
    source = photo_set(tmp_path / "src", subjects=subjects, per_subject=3)
    return catalog, source, config


# One catalog goes through the three nights a refresh must get right (each refresh of it
# costs a quarter of a minute, so the nights share it).
def test_a_refresh_builds_everything_an_unchanged_one_nothing_and_a_new_photo_only_what_depends_on_it(tmp_path):
    catalog, source, config = setup(tmp_path)
    run = catalog_refresh(str(catalog.root), str(source), config, str(tmp_path / "site"))

    assert run.record.status == "completed", run.summary()
    adapters = {(a["subject_id"], a["method"]) for a in catalog.read("adapters").to_pylist()}
    assert adapters == {(s, m) for s in ("red_mug", "blue_box") for m in ("sft", "sfo")}
    assert [m["method"] for m in catalog.read("models").to_pylist()] == ["jedi"]
    metrics = catalog.read("metrics").to_pylist()
    assert {(m["subject_id"], m["method"]) for m in metrics} == {
        (s, m) for s in ("red_mug", "blue_box") for m in ("sft", "sfo", "jedi")}
    # (Masked metrics need a subject GrabCut can find; the tiny model's samples have none.)
    assert {"dino", "clip_i", "clip_t", "diversity"} <= {m["metric"] for m in metrics}
    kinds = {m["scorer_kind"] for m in metrics}
    assert "random-test" in kinds and "pretrained" not in kinds  # no real scorer offline: flagged
    runs = catalog.read("runs").to_pylist()
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["catalog_version"] == run.version.number
    assert list_versions(catalog)[0].number == run.version.number
    assert (tmp_path / "site" / "index.html").exists() and run.dashboard == tmp_path / "site"
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()  # the summary links the dashboard
    summary = next(a for a in artifact if a.key == "catalog-refresh-summary")
    assert "completed" in summary.data and str(tmp_path / "site" / "index.html") in summary.data

    again = catalog_refresh(str(catalog.root), str(source), config, str(tmp_path / "site"))
    assert again.record.ran == [] and again.version is None and again.record.status == "completed"
    assert catalog.read("metrics").num_rows == len(metrics)
    assert list_versions(catalog)[0].number == run.version.number
    assert len(catalog.read("runs").to_pylist()) == 2

    before = {(a["subject_id"], a["method"]): a["adapter_id"] for a in catalog.read("adapters").to_pylist()}

    photo_set(tmp_path / "src", subjects=("red_mug",), per_subject=4)  # adds red_mug's 4th photo
    # A lost joint-set shard of an unchanged subject, with no encoded latents to fall back on
    # (a fresh machine's empty work/), breaks the joint model's retraining, and only that.
    shard = next(r["shard"] for r in catalog.read("jointsets").to_pylist() if r["subject_id"] == "blue_box")
    catalog.blob_path(shard).unlink()
    shutil.rmtree(catalog.root / WORK_DIR / "set-latents")
    run = catalog_refresh(str(catalog.root), str(source), config, str(tmp_path / "site"))

    assert run.record.status == "partial" and [f["item"] for f in run.record.failures] == ["tune jedi"]
    assert any("red_mug" in item and "sft adapter" in item for item in run.record.ran)
    assert not any("blue_box" in item and "adapter" in item for item in run.record.ran)
    after = {(a["subject_id"], a["method"]): a["adapter_id"] for a in catalog.read("adapters").to_pylist()}
    assert after[("blue_box", "sft")] == before[("blue_box", "sft")]
    assert after[("red_mug", "sft")] != before[("red_mug", "sft")]
    evaluated = [item for item in run.record.ran if item.endswith("evaluated")]
    assert sorted(evaluated) == ["red_mug/sfo: evaluated", "red_mug/sft: evaluated"]
    row = catalog.read("runs").to_pylist()[-1]
    assert row["status"] == "partial" and "tune jedi" in json.loads(row["failures"])[0]["item"]


def test_cli_refresh_evaluate_and_dashboard(tmp_path, capfd):
    catalog, source, config = setup(tmp_path, subjects=("vase",))
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    cli = lambda *args: main([*args, "--catalog", str(catalog.root)])  # noqa: E731
    assert cli("refresh", "--source", str(source)) == 0
    assert "dashboard:" in capfd.readouterr().out
    assert cli("evaluate", "--method", "sft") == 0
    assert "already current 1" in capfd.readouterr().out
    # A real scoring model in place of the random-test one re-scores: old numbers are not reused.
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                       image_size=64, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    scored = config.model_copy(update={"evaluate": config.evaluate.model_copy(
        update={"dino_model": str(tmp_path / "dino")})})
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(scored.model_dump(mode="json")))
    assert cli("evaluate", "--method", "sft") == 0
    assert "evaluated 1, already current 0" in capfd.readouterr().out
    dino = {m["scorer"] for m in catalog.read("metrics").to_pylist() if m["metric"] == "dino"}
    assert any(name.startswith(str(tmp_path / "dino")) for name in dino) and len(dino) == 2
    assert cli("dashboard", "--out", str(tmp_path / "elsewhere")) == 0
    assert (tmp_path / "elsewhere" / "index.html").exists()
