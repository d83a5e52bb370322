"""Model families: SDXL and FLUX load, encode and train through the same calls as SD; the
families subjectflow does not run are refused with the reason before anything loads."""

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from subjectflow.jointsets import build_jointsets
from subjectflow.methods import registry
from subjectflow.methods.base import Context
from subjectflow.methods.concepts.model import ConceptWeights
from subjectflow.methods.jedi.attention import coupled
from subjectflow.methods.oneactor.math import load_projector
from subjectflow.models import (TINY_FLUX, TINY_SD3, TINY_SDXL, ModelNotAvailable, build_tiny, load_components,
                                load_pipeline, native_resolution, resolve_model_path)
from subjectflow.models.families import FLUX, SD3, SDXL
from subjectflow.training.diffusion import noised_prediction, training_timesteps, unet_eps
from subjectflow.training.subjects import TuningError, load_subject
from tests.training.conftest import ingested_catalog, tiny_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def sdxl_dir(models):
    return build_tiny(models / TINY_SDXL, TINY_SDXL)


@pytest.fixture(scope="module")
def sd3_dir(models):
    return build_tiny(models / TINY_SD3, TINY_SD3)


@pytest.fixture(scope="module")
def flux_dir(models):
    return build_tiny(models / TINY_FLUX, TINY_FLUX)


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


def test_tiny_flux_encodes_with_t5_and_clip_and_its_transformer_denoises_packed_latents(flux_dir):
    parts = load_components(str(flux_dir), flux_dir.parent, torch.device("cpu"), torch.float32)
    assert parts.family is FLUX and type(parts.unet).__name__ == "FluxTransformer2DModel"
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert native_resolution(str(flux_dir)) == 128 * 2  # FluxPipeline's default 128 latent pixels
    for frozen in (*parts.text_encoders(), parts.vae):
        assert not any(p.requires_grad for p in frozen.parameters())
    # The T5 tokenizer written for tiny-flux: a corpus word is one piece, then "</s>".
    ids = parts.tokenizer_2("a photo of sks mug").input_ids
    assert len(ids) == 6 and ids[-1] == parts.tokenizer_2.eos_token_id

    prompt = FLUX.encode(parts, "a photo of sks mug", 32)
    assert prompt.states.shape == (1, 512, 32) and prompt.pooled.shape == (1, 32) and prompt.time_ids is None
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pred, target = noised_prediction(parts.unet, torch.float32, parts.noise_scheduler, x0, prompt,
                                     torch.Generator().manual_seed(1))
    assert pred.shape == target.shape == x0.shape
    # The velocity target: the noise drawn after x0's draw, minus x0.
    generator = torch.Generator().manual_seed(1)
    torch.testing.assert_close(target, torch.randn(x0.shape, generator=generator) - x0)
    # CLIP's pooled embedding reaches the transformer, not only T5's states.
    t = torch.tensor([0.5, 0.5])
    other = type(prompt)(prompt.states, torch.zeros_like(prompt.pooled))
    eps = unet_eps(parts.unet, torch.float32, x0, t, prompt)
    assert not torch.equal(unet_eps(parts.unet, torch.float32, x0, t, other), eps)


def test_tiny_sd3_joins_its_three_encoders_on_the_sequence_and_its_transformer_takes_t_times_1000(sd3_dir):
    parts = load_components(str(sd3_dir), sd3_dir.parent, torch.device("cpu"), torch.float32)
    assert parts.family is SD3 and type(parts.unet).__name__ == "SD3Transformer2DModel"
    assert len(parts.text_encoders()) == 3 and native_resolution(str(sd3_dir)) == 64
    prompt = SD3.encode(parts, "a photo of sks mug", 32)
    # Both CLIPs' states (32 + 32, padded to T5's 64) then T5's 256; both pooled outputs side by side.
    assert prompt.states.shape == (1, 77 + 256, 64) and prompt.pooled.shape == (1, 64)
    assert torch.equal(prompt.states[:, 77:], parts.text_encoder_3(
        parts.tokenizer_3("a photo of sks mug", padding="max_length", max_length=256,
                          return_tensors="pt").input_ids).last_hidden_state)

    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.25])
    pred = unet_eps(parts.unet, torch.float32, x0, t, prompt)
    direct = parts.unet(hidden_states=x0, encoder_hidden_states=prompt.states.expand(2, -1, -1),
                        pooled_projections=prompt.pooled.expand(2, -1), timestep=t * 1000).sample
    torch.testing.assert_close(pred, direct)
    # SFT's timesteps are logit-normal picks of the shifted sigmas, as diffusers' SD3 script draws them.
    sigmas = training_timesteps(parts.noise_scheduler, 4000, torch.Generator().manual_seed(2), SD3.sft_timesteps)
    grid = parts.noise_scheduler.sigmas.tolist()
    index = torch.tensor([grid.index(sigma) for sigma in sigmas.tolist()])  # every one is a training sigma
    # The middle third of the schedule holds 51% of a logit-normal(0, 1) draw (uniform: 33%).
    assert 0.47 < ((index >= 333) & (index < 667)).float().mean().item() < 0.55


@pytest.mark.parametrize("model, family", [("sdxl_dir", SDXL), ("sd3_dir", SD3), ("flux_dir", FLUX)],
                         ids=["sdxl", "sd3", "flux"])
def test_sfo_trains_on_its_negatives_and_samples_and_methods_not_written_for_the_family_are_refused(
        tmp_path, request, model, family):
    folder = request.getfixturevalue(model)
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",))
    config = tiny_config(model={"base": str(folder)}, train={"steps": 2, "checkpoint_every": 2},
                         sfo={"steps": 2}, negatives={"per_photo": 1, "steps": 2})
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        subject = load_subject(catalog, "red_mug")
        # Refused from the settings alone (the model is not loaded for them): the UNet methods on transformers.
        refused = [m for m in ("jedi", "oneactor", "detex") if family.name not in registry.get(m).families]
        assert refused == ([] if family is SDXL else ["oneactor", "detex"])
        for method in refused:
            with pytest.raises(TuningError, match=rf"{method} does not run on {family.label} base models .* it "
                                                  r"runs on Stable Diffusion 1.x/2.x, SDXL: pick such a base model"):
                registry.artefact_ids(ctx, method, subject)
        assert ctx._parts is None

        rows = registry.ensure(ctx, "sfo", subject)  # SFT, then its img2img negatives, then SFO
        assert ctx.parts.family is family and rows["sft"]["steps"] == rows["sfo"]["steps"] == 2
        assert rows["sfo"]["base_model"].startswith(str(folder))
        negatives = catalog.read("negatives").to_pylist()
        assert len(negatives) == len(subject.images) and {n["resolution"] for n in negatives} == {32}
        assert all(Image.open(catalog.blob_path(n["file"])).size == (32, 32) for n in negatives)
        # Saved as the family's pipeline loads LoRAs: "unet." keys, or FluxPipeline's "transformer.".
        keys = safetensors.torch.load_file(catalog.blob_path(rows["sfo"]["file"])).keys()
        assert {k.split(".")[0] for k in keys} == {family.denoiser_folder}
        plain = load_pipeline(str(folder), folder.parent, torch.device("cpu"), torch.float32)
        weights = catalog.blob_path(rows["sfo"]["file"])
        plain.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="sfo")
        assert "sfo" in getattr(plain, family.denoiser_folder).peft_config
        samples = registry.sample(ctx, "sfo", "red_mug", "a {subject} on the beach", 1)
    assert [s["adapter_id"] for s in samples] == [rows["sfo"]["adapter_id"]]
    assert samples[0]["resolution"] == 32 and catalog.blob_path(samples[0]["file"]).is_file()


def test_oneactor_tunes_on_sdxl_with_the_offset_in_both_encoders_states_and_samples_cluster_guided(tmp_path,
                                                                                                   sdxl_dir):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",))
    config = tiny_config(model={"base": str(sdxl_dir)}, oneactor={"steps": 2, "aux_images": 3, "cluster_steps": 2})
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        row = registry.ensure(ctx, "oneactor", load_subject(catalog, "red_mug"))["oneactor"]
        projector, features = load_projector(catalog.blob_path(row["file"]).read_bytes())
        # Its offset is as wide as SDXL's token states: both CLIP encoders' side by side.
        assert projector.text_width == 32 + 32 == ctx.parts.unet.config.cross_attention_dim
        assert features["auxiliary"].shape[0] == 3 and row["steps"] == 2
        unconditional = SDXL.unconditional(ctx.parts, 32)  # zeros, as SDXL's pipeline for an empty prompt
        assert not unconditional.states.any() and not unconditional.pooled.any()
        samples = registry.sample(ctx, "oneactor", "red_mug", "a {subject} on the beach", 1)
    assert samples[0]["prompt"] == "a mug on the beach" and catalog.blob_path(samples[0]["file"]).is_file()


@pytest.mark.parametrize("model", ["sd3_dir", "flux_dir"], ids=["sd3", "flux"])
def test_jedi_joins_a_sets_members_in_the_transformers_attention_and_a_set_of_one_is_the_plain_model(request,
                                                                                                    model):
    folder = request.getfixturevalue(model)
    parts = load_components(str(folder), folder.parent, torch.device("cpu"), torch.float32)
    prompt = parts.family.encode(parts, "a photo of a mug", 32).expand(2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    other = x.clone()
    other[1] += 1.0  # only the second member changes
    t = torch.tensor([0.5, 0.5])
    before = {name: type(p) for name, p in parts.unet.attn_processors.items()}

    def denoise(latents):
        return unet_eps(parts.unet, torch.float32, latents, t, prompt)

    plain, plain_other = denoise(x), denoise(other)
    torch.testing.assert_close(plain[0], plain_other[0])  # uncoupled, the first member ignores the second
    with coupled(parts.unet, 1):
        torch.testing.assert_close(denoise(x), plain)
    twins = x[:1].repeat(2, 1, 1, 1)
    plain_twins = denoise(twins)
    with coupled(parts.unet, 2):
        joint, joint_other, joint_twins = denoise(x), denoise(other), denoise(twins)
    assert (joint[0] - joint_other[0]).abs().max() > 1e-4  # coupled, it attends to the second
    # Two identical members: every key is there twice, at the same positions, so attention
    # (and the output) is the plain model's; a member's positions misplaced in the set break this.
    torch.testing.assert_close(joint_twins, plain_twins, atol=1e-4, rtol=1e-4)
    assert {name: type(p) for name, p in parts.unet.attn_processors.items()} == before


@pytest.mark.parametrize("model, family", [("sdxl_dir", SDXL), ("sd3_dir", SD3), ("flux_dir", FLUX)],
                         ids=["sdxl", "sd3", "flux"])
def test_jedi_trains_then_zero_shot_sfo_on_its_own_set_completions_and_samples_by_completion(tmp_path, request,
                                                                                            model, family):
    folder = request.getfixturevalue(model)
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",))
    config = tiny_config(model={"base": str(folder)}, jointsets={"resolution": 32, "sets_per_subject": 2},
                         joint={"steps": 2}, sfo={"steps": 2}, negatives={"per_photo": 1, "steps": 2})
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        rows = registry.ensure(ctx, "jedi-sfo", None)  # the joint model, its CDNS completions, then SFO
        assert ctx.parts.family is family and rows["jedi"]["steps"] == rows["jedi-sfo"]["steps"] == 2
        assert catalog.read("negatives").num_rows == len(load_subject(catalog, "red_mug").images)
        samples = registry.sample(ctx, "jedi", "red_mug", "a {subject} on the beach", 1)
    assert samples[0]["resolution"] == 32 and catalog.blob_path(samples[0]["file"]).is_file()


def test_detex_puts_its_token_into_both_sdxl_encoders_and_its_export_reproduces_a_sample_in_stock_diffusers(
        tmp_path, sdxl_dir):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",))
    config = tiny_config(model={"base": str(sdxl_dir)},
                         detex={"steps": 2, "mapper_hidden": 16, "learning_rate": 1e-2, "kv_learning_rate": 1e-2})
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        registry.tune(ctx, "detex", "red_mug")
        ours = registry.sample(ctx, "detex", "red_mug", "a {subject} on the beach", 1)[0]
        out = tmp_path / "export"
        files = {p.name for p in registry.export(ctx, "detex", "red_mug", out)}
    assert {"learned_embeds.safetensors", "learned_embeds_2.safetensors"} <= files
    token = next(iter(safetensors.torch.load_file(out / "learned_embeds_2.safetensors")))
    # Each encoder's own rows: CLIP-L's (32 wide here) and CLIP-G's.
    assert [safetensors.torch.load_file(out / name)[token].shape for name in
            ("learned_embeds.safetensors", "learned_embeds_2.safetensors")] == [(32,), (32,)]

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(str(out / "learned_embeds_2.safetensors"), token=token,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    cfg = config.generate
    theirs = pipe(ours["prompt"], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution,
                  width=cfg.resolution, generator=torch.Generator("cpu").manual_seed(ours["seed"])).images[0]
    difference = np.abs(np.asarray(theirs, dtype=int) - np.asarray(Image.open(catalog.blob_path(ours["file"])),
                                                                     dtype=int))
    assert difference.max() <= 1


def test_concept_tokens_learn_on_sdxl_in_both_encoders_and_sample(tmp_path, sdxl_dir):
    catalog = ingested_catalog(tmp_path, per_subject=2)
    config = tiny_config(model={"base": str(sdxl_dir)},
                         concepts={"steps": 2, "e_step_every": 1, "learning_rate": 1e-2, "refine": "otsu"})
    box = load_subject(catalog, "blue_box").images[0]["image_id"]
    with Context.open(catalog, config, say=lambda line: None) as ctx:
        registry.learn(ctx, "scene", ["subject:red_mug", f"image:{box[:10]}:background=beach"])
        row = next(r for r in catalog.read("models").to_pylist() if r["method"] == "concepts")
        vectors = ConceptWeights.read(catalog.blob_path(row["file"])).vectors
        assert {tuple(v.shape) for v in vectors.values()} == {(32 + 32,)}  # both encoders' rows side by side
        sample = registry.sample(ctx, "concepts", None, f"a photo of {next(iter(vectors))} on the beach", 1)[0]
        files = {p.name for p in registry.export_set(ctx, "scene", tmp_path / "export")}
    assert catalog.blob_path(sample["file"]).is_file() and "learned_embeds-0_2.safetensors" in files


def test_an_unknown_pipeline_is_refused_when_the_model_opens_naming_the_families_that_run(sdxl_dir, tmp_path):
    copy = shutil.copytree(sdxl_dir, tmp_path / "model")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelNotAvailable, match="is a KandinskyV22Pipeline model; subjectflow supports Stable "
                                                "Diffusion 1.x/2.x, SDXL, Stable Diffusion 3, FLUX.1: pick such"):
        resolve_model_path(str(copy), tmp_path)
