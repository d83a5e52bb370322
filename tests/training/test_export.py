"""`export` of a LoRA policy: one file a plain diffusers pipeline loads with one call and
gets exactly the catalog's stacked adapters, with its provenance and a model card."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.methods import registry
from tests.training.conftest import context, tiny_config


def plain_pipe(catalog):
    pipe = StableDiffusionPipeline.from_pretrained(catalog.root / MODELS_DIR / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixed_sample(pipe):
    return pipe("a photo of sks box", num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_sfo_exports_as_one_lora_equal_to_the_stacked_policy(two_subjects, tmp_path):
    config = tiny_config(train={"steps": 6, "learning_rate": 5e-2}, sfo={"steps": 4, "learning_rate": 5e-2})
    ctx = context(two_subjects, config)
    rows = registry.tune(ctx, "sfo", "blue_box")
    files = registry.export(ctx, "sfo", "blue_box", tmp_path / "out")
    weights = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert weights in files and (tmp_path / "out" / "README.md") in files

    merged = plain_pipe(two_subjects)
    merged.load_lora_weights(str(weights.parent), weight_name=weights.name)
    stacked = plain_pipe(two_subjects)
    parent = rows.artefact["parent_adapter_id"]
    sft = next(r for r in two_subjects.read("adapters").to_pylist() if r["adapter_id"] == parent)
    for name, row in (("sft", sft), ("sfo", rows.artefact)):
        path = two_subjects.blob_path(row["file"])
        stacked.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    stacked.set_adapters(["sft", "sfo"], [1.0, 1.0])
    plain = fixed_sample(plain_pipe(two_subjects))
    assert np.abs(fixed_sample(stacked) - plain).max() > 1e-3  # the policy does change the image
    np.testing.assert_allclose(fixed_sample(merged), fixed_sample(stacked), atol=1e-5)

    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    assert meta["subjectflow.trigger"] == "sks box" and json.loads(meta["subjectflow.ranks"]) == [4, 16]
    assert meta["subjectflow.base_model"] == ctx.base
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`sks box`" in card and "rank 20" in card and "Not evaluated yet" in card
