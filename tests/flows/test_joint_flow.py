"""JeDi end to end on the tiny model, under the Prefect harness: joint sets -> joint model ->
set-completion samples, JeDi negatives and zero-shot SFO, through the CLI."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from flows.cli import main
from subjectflow.catalog import list_versions
from subjectflow.jointsets import build_jointsets
from subjectflow.jointsets import read_sets
from subjectflow.methods import registry
from subjectflow.methods.jedi.model import current_sets, train_joint
from subjectflow.methods.jedi.set_latents import encode_sets
from subjectflow.methods.jedi.zero_shot_sfo import CAPTIONS, pair_subjects
from subjectflow.training.artefacts import open_model
from subjectflow.training.data import encode_prompt
from tests.training.conftest import context, ingested_catalog, tiny_config
from tests.training.test_export import fixed_sample, plain_pipe

JOINT = {"jointsets": {"resolution": 32, "sets_per_subject": 2}, "joint": {"steps": 4, "max_references": 2}}


def test_jointsets_tune_jedi_and_generate_with_references(tmp_path, capfd):
    catalog = ingested_catalog(tmp_path)
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(tiny_config(**JOINT).model_dump(mode="json")))
    cli = lambda *args: main([*args, "--catalog", str(catalog.root)])  # noqa: E731

    assert cli("generate", "--subject", "red_mug", "--method", "jedi") == 2
    assert "subjectflow jointsets" in capfd.readouterr().err
    assert cli("jointsets") == 0
    assert catalog.read("jointsets").num_rows == 2 * 2 * 3
    assert cli("tune", "--method", "jedi") == 0
    models = catalog.read("models").to_pylist()
    assert [(m["method"], m["weights"], m["steps"]) for m in models] == [("jedi", "lora", 4)]
    versions = len(list_versions(catalog))
    assert cli("tune", "--method", "jedi") == 0 and "reused" in capfd.readouterr().out  # nothing new: no version either
    assert len(list_versions(catalog)) == versions

    assert cli("generate", "--subject", "red_mug", "--method", "jedi", "--references", "2", "--n", "2",
               "--prompt", "a {subject} on the beach") == 0
    samples = catalog.read("samples").to_pylist()
    assert len(samples) == 2 and {s["prompt"] for s in samples} == {"a mug on the beach"}
    settings = json.loads(samples[0]["params"])
    assert samples[0]["model_id"] == models[0]["model_id"] and samples[0]["method"] == "jedi"
    assert len(settings["references"]) == 2 and settings["reference_mode"] == "clean"
    assert settings["image_guidance"] == 2.0 and settings["text_guidance"] == 7.5

    assert cli("negatives", "--method", "jedi-sfo", "--subject", "red_mug") == 0
    negatives = catalog.read("negatives").to_pylist()
    assert len(negatives) == 3 and {n["generator"] for n in negatives} == {"jedi"}
    assert {n["generator_adapter_id"] for n in negatives} == {models[0]["model_id"]}

    assert cli("tune", "--method", "jedi-sfo") == 0
    sfo = [m for m in catalog.read("models").to_pylist() if m["method"] == "sfo-joint"]
    assert len(sfo) == 1 and sfo[0]["parent_model_id"] == models[0]["model_id"]
    pairs = json.loads(sfo[0]["params"])["pairs"]  # CDNS for a reference model: the negative is made from the context
    made_from = {n["negative_id"]: n["image_id"] for n in catalog.read("negatives").to_pylist()}
    assert len(pairs) == 6 and all(p["context"] == made_from[p["negative_id"]] != p["positive"] for p in pairs)
    assert {p["caption"] for p in pairs} <= {t.format(c=c) for t in CAPTIONS for c in ("mug", "box")}
    assert len(catalog.read("negatives").to_pylist()) == 6  # pairs from every subject
    assert cli("generate", "--subject", "blue_box", "--method", "jedi-sfo") == 0
    newest = max(catalog.read("samples").to_pylist(), key=lambda s: s["created_at"])
    assert newest["subject_id"] == "blue_box" and newest["model_id"] == sfo[0]["model_id"]

    # Exported: one LoRA that is the joint model and zero-shot SFO's LoRA stacked.
    out = tmp_path / "export"
    assert cli("export", "--method", "jedi-sfo", "--subject", "blue_box", "--out", str(out)) == 0
    merged = plain_pipe(catalog)
    merged.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    stacked = plain_pipe(catalog)
    for name, row in (("jedi", models[0]), ("sfo", sfo[0])):
        path = catalog.blob_path(row["file"])
        stacked.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    stacked.set_adapters(["jedi", "sfo"], [1.0, 1.0])
    np.testing.assert_allclose(fixed_sample(merged), fixed_sample(stacked), atol=1e-5)
    card = (out / "README.md").read_text()
    assert "set completion" in card and "rank 32" in card and "`box`" in card


@pytest.mark.parametrize("weights", ["lora", "unet"])
def test_a_resumed_joint_training_equals_an_uninterrupted_one(tmp_path, weights):
    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2},
                         joint={"steps": 4, "weights": weights}, train={"checkpoint_every": 2})
    made = []
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        catalog = ingested_catalog(tmp_path / name)
        build_jointsets(catalog, config.jointsets, say=lambda _: None)
        for stop in stops:
            row = train_joint(context(catalog, config), stop_after=stop)
        made.append(catalog.blob_path(row["file"]).read_bytes())
    assert made[0] == made[1]


def test_joint_training_keeps_one_text_embedding_per_distinct_caption(tmp_path):
    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2})
    catalog = ingested_catalog(tmp_path)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    parts, _ = open_model(catalog, config)
    rows = current_sets(catalog, config)
    encoded = encode_sets(catalog, parts, rows, 32, "tiny")
    latents, captions, set_captions = encoded.latents, encoded.captions.states, encoded.set_captions

    sets = sorted(read_sets(catalog, sorted({r["shard"] for r in rows})), key=lambda s: s.set_id)
    assert latents.shape[:2] == set_captions.shape == (len(sets), config.jointsets.set_size)
    assert captions.shape[0] - 1 == len({c for s in sets for c in s.captions}) < set_captions.numel()
    torch.testing.assert_close(captions[encoded.null_caption], encode_prompt(parts.tokenizer, parts.text_encoder, "")[0])

    # Cached per set: encoding again decodes no shard and gives the same latents.
    import subjectflow.methods.jedi.set_latents as set_latents

    first = latents[torch.arange(len(sets))]
    read = []
    original = set_latents.read_sets
    set_latents.read_sets = lambda *a: read.append(a) or original(*a)
    try:
        again = encode_sets(catalog, parts, rows, 32, "tiny")
    finally:
        set_latents.read_sets = original
    assert all(not todo for *_, todo in read)  # asked for no set: every one was cached
    assert torch.equal(again.latents[torch.arange(len(sets))], first)
    for members, indices in zip(sets, set_captions):
        for caption, i in zip(members.captions, indices):
            torch.testing.assert_close(captions[i], encode_prompt(parts.tokenizer, parts.text_encoder, caption)[0])


def test_full_unet_joint_training_keeps_fp32_master_weights_under_bf16(tmp_path):
    from safetensors.torch import load_file

    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2}, model={"precision": "bf16"},
                         joint={"steps": 2, "weights": "unet", "learning_rate": 1e-6})
    catalog = ingested_catalog(tmp_path)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    ctx = context(catalog, config)
    before = {k: v.float().clone() for k, v in ctx.parts.unet.state_dict().items()}
    row = train_joint(ctx)
    trained = load_file(catalog.blob_path(row["file"]))
    assert {v.dtype for v in trained.values()} == {torch.float32}  # the master weights, not a bf16 copy
    moved = [k for k, v in trained.items() if not torch.equal(v, before[k])]
    # lr 1e-6 moves a weight by ~1e-6, below bf16's resolution for nearly every weight:
    # trained in bf16 these updates would round away.
    assert len(moved) > len(trained) // 2
    assert ctx.parts.unet.dtype == torch.bfloat16  # back to the run's dtype for sampling

    files = registry.export(ctx, "jedi", None, tmp_path / "export")
    assert tmp_path / "export" / "unet" in files
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet").state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_zero_shot_sfo_skips_a_subject_with_one_photo(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=1)
    assert pair_subjects(catalog, tiny_config()) == []
