"""Model families: SDXL loads, encodes and trains through the same calls as SD; the families
subjectflow does not run are refused with the reason before anything loads."""

import json
import shutil

import pytest
import torch

from subjectflow.methods import registry
from subjectflow.methods.base import Context
from subjectflow.models import TINY_SDXL, ModelNotAvailable, build_tiny, load_components, resolve_model_path
from subjectflow.models.families import SDXL
from subjectflow.training.diffusion import unet_eps
from subjectflow.training.subjects import TuningError, load_subject
from tests.training.conftest import ingested_catalog, tiny_config


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / TINY_SDXL, TINY_SDXL)


def test_tiny_sdxl_loads_both_text_encoders_frozen_and_its_prompts_condition_the_unet(sdxl_dir):
    parts = load_components(str(sdxl_dir), sdxl_dir.parent, torch.device("cpu"), torch.bfloat16)
    assert parts.family is SDXL
    assert len(parts.text_encoders()) == 2
    for frozen in (*parts.text_encoders(), parts.vae):
        assert frozen.dtype == torch.bfloat16 and not any(p.requires_grad for p in frozen.parameters())

    prompt = SDXL.encode(parts, "a photo of sks mug", 32)
    # Both encoders' states side by side, the second's pooled output, and the size ids.
    assert prompt.states.shape == (1, 77, 32 + 32) == (1, 77, parts.unet.config.cross_attention_dim)
    assert prompt.pooled.shape == (1, 32) and prompt.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]

    noisy, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    eps = unet_eps(parts.unet, torch.bfloat16, noisy, t, prompt)
    assert eps.shape == noisy.shape and eps.dtype == torch.float32
    # The pooled embedding and the size ids reach the UNet (its added embedding), not only the states.
    other_size = type(prompt)(prompt.states, prompt.pooled, torch.tensor([[64., 64, 0, 0, 64, 64]]))
    assert not torch.equal(unet_eps(parts.unet, torch.bfloat16, noisy, t, other_size), eps)


def test_sfo_trains_on_its_sdxl_negatives_and_samples_and_methods_not_written_for_sdxl_are_refused(tmp_path,
                                                                                                   sdxl_dir):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",))
    config = tiny_config(model={"base": str(sdxl_dir)}, train={"steps": 2, "checkpoint_every": 2},
                         sfo={"steps": 2}, negatives={"per_photo": 1, "steps": 2})
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        subject = load_subject(catalog, "red_mug")
        # Refused from the settings alone: the model is not loaded for it.
        with pytest.raises(TuningError, match=r"oneactor does not run on SDXL base models .* it runs on "
                                              r"Stable Diffusion 1.x/2.x: pick such a base model"):
            registry.artefact_ids(ctx, "oneactor", subject)
        assert ctx._parts is None

        rows = registry.ensure(ctx, "sfo", subject)  # SFT, then its img2img negatives, then SFO
        assert ctx.parts.family is SDXL and rows["sft"]["steps"] == rows["sfo"]["steps"] == 2
        assert rows["sfo"]["base_model"].startswith(str(sdxl_dir))
        negatives = catalog.read("negatives").to_pylist()
        assert len(negatives) == len(subject.images) and {n["resolution"] for n in negatives} == {32}
        assert all(catalog.blob_path(n["file"]).is_file() for n in negatives)
        samples = registry.sample(ctx, "sfo", "red_mug", "a {subject} on the beach", 1)
    assert [s["adapter_id"] for s in samples] == [rows["sfo"]["adapter_id"]]
    assert samples[0]["resolution"] == 32 and catalog.blob_path(samples[0]["file"]).is_file()


@pytest.mark.parametrize("pipeline, message", [
    ("StableDiffusion3Pipeline", "recognises Stable Diffusion 3 models but does not train or sample them yet"),
    ("FluxPipeline", "recognises FLUX.1 models but does not train or sample them yet"),
    ("KandinskyV22Pipeline", "is a KandinskyV22Pipeline model; subjectflow supports Stable Diffusion 1.x/2.x, SDXL"),
])
def test_families_it_cannot_run_are_refused_when_the_model_opens(sdxl_dir, tmp_path, pipeline, message):
    copy = shutil.copytree(sdxl_dir, tmp_path / "model")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    with pytest.raises(ModelNotAvailable, match=message):
        resolve_model_path(str(copy), tmp_path)
