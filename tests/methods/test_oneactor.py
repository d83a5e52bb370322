"""OneActor (METHODS.md section 3): projector sizing, the class-word offset, cluster
guidance against plain CFG, the tuning example, resume, and the catalog round trip."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save

from subjectflow.methods import registry
from subjectflow.methods.oneactor import train_oneactor
from subjectflow.methods.oneactor.math import (PRESETS, GuidanceSettings, OneActorObjective, Projector, apply_offset,
                                               class_token_positions, cluster_guidance, load_projector,
                                               mid_block_input, projector_bytes, sample)
from subjectflow.training.data import encode_prompt
from subjectflow.training.subjects import load_subject
from tests.training.conftest import context, ingested_catalog, tiny_config

ONEACTOR = {"steps": 4, "aux_images": 3, "cluster_steps": 3}

SD_UNET = {  # the shapes that decide the projector, as in SD 1.5's and SD 2.1's unet/config.json
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    catalog = ingested_catalog(tmp_path_factory.mktemp("oneactor"))
    config = tiny_config(oneactor=ONEACTOR)
    return catalog, config, context(catalog, config)


@pytest.mark.parametrize("sample_size, width, head_dim, feature, stage", [
    (64, 768, 8, (1280, 8, 8), (320, 2, 2)),  # SD 1.5 at 512 px: one halving stage fewer
    (96, 1024, (5, 10, 20, 20), (1280, 12, 12), (160, 2, 2)),  # SD 2.1 at 768 px
])
def test_the_projector_is_sized_from_the_unet_for_sd1_and_sd2(sample_size, width, head_dim, feature, stage):
    with torch.device("meta"):  # only the config matters; no 3 GB of weights
        unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=width,
                                    attention_head_dim=head_dim, **SD_UNET)
    projector = Projector.for_unet(unet, width)
    assert (projector.in_channels, projector.size, projector.size) == feature
    linear = projector.head[1]
    assert linear.in_features == stage[0] * stage[1] * stage[2] and linear.out_features == width
    assert 55e6 < sum(p.numel() for p in projector.parameters()) < 70e6  # METHODS.md: about 60-66M
    delta = projector.project(torch.randn(2, *feature))
    assert delta.shape == (2, width)


def test_the_mid_block_hook_captures_the_feature_the_projector_expects(tiny):
    _, config, ctx = tiny
    unet = ctx.parts.unet
    latent = config.train.resolution // 2  # the tiny VAE halves
    projector = Projector.for_unet(unet, ctx.parts.text_encoder.config.hidden_size, sample_size=latent)
    embeds = torch.zeros(2, ctx.parts.tokenizer.model_max_length, unet.config.cross_attention_dim)
    with torch.no_grad(), mid_block_input(unet) as captured:
        unet(torch.randn(2, 4, latent, latent), torch.tensor([10, 10]), encoder_hidden_states=embeds)
    assert len(captured) == 1
    assert tuple(captured[0].shape[1:]) == (projector.in_channels, projector.size, projector.size)
    assert projector.project(captured[0]).shape == (2, projector.text_width)


def test_the_offset_lands_only_on_the_class_tokens_also_when_the_noun_splits(tiny):
    tokenizer = tiny[2].parts.tokenizer
    assert len(tokenizer("rc car", add_special_tokens=False).input_ids) > 1
    for noun, prompt in (("mug", "a photo of a mug on a table"), ("rc car", "an rc car in the snow")):
        positions = class_token_positions(tokenizer, prompt, noun)
        assert len(positions) == len(tokenizer(noun, add_special_tokens=False).input_ids)
        embeds = torch.randn(1, tokenizer.model_max_length, 8)
        delta = torch.randn(8)
        moved = apply_offset(embeds, positions, delta, scale=0.8)
        changed = (moved != embeds).any(dim=-1)[0].nonzero().flatten().tolist()
        assert changed == positions
        assert torch.allclose(moved[0, positions], embeds[0, positions] + 0.8 * delta)
    with pytest.raises(ValueError, match="not in prompt"):
        class_token_positions(tokenizer, "a photo of a cup", "mug")


def test_the_three_way_guidance_is_the_papers_formula():
    e_u, e_t, e_a = torch.randn(3, 2, 4, 8, 8).unbind(0)
    eta1, eta2 = 8.5, 1.0
    expected = e_u + eta1 * (e_t - e_u) - eta2 * (e_a - e_u)
    assert torch.allclose(cluster_guidance(e_u, e_t, e_a, eta1, eta2), expected)
    assert PRESETS["paper"] == GuidanceSettings(8.5, 1.0, 0.8)
    assert (PRESETS["released"].eta1, PRESETS["released"].eta2) == (7.5, 0.0)


def _embeds(parts, text):
    return encode_prompt(parts.tokenizer, parts.text_encoder, text)


def test_zero_offsets_without_the_average_term_are_plain_cfg_exactly(tiny):
    parts = tiny[2].parts
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a mug"
    plain = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(3)).images
    settings = GuidanceSettings(eta1=7.5, eta2=0.0, v=0.8, guided_steps=2, guidance=7.5)
    width = parts.text_encoder.config.hidden_size
    guided = sample(parts.unet, DDIMScheduler.from_config(parts.noise_scheduler.config), parts.vae,
                    _embeds(parts, prompt), _embeds(parts, ""), torch.zeros(width), torch.randn(width),
                    class_token_positions(parts.tokenizer, prompt, "mug"), settings, steps=4,
                    generator=torch.Generator().manual_seed(3), height=32, width=32)
    assert torch.equal(guided, plain)


def test_guidance_covers_the_first_steps_and_plain_cfg_the_rest(tiny):
    parts = tiny[2].parts
    batches = []
    hook = parts.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    width = parts.text_encoder.config.hidden_size
    try:
        sample(parts.unet, DDIMScheduler.from_config(parts.noise_scheduler.config), parts.vae,
               _embeds(parts, "a mug"), _embeds(parts, ""), torch.randn(width), torch.randn(width),
               class_token_positions(parts.tokenizer, "a mug", "mug"), PRESETS["paper"], steps=30,
               generator=torch.Generator().manual_seed(0), height=32, width=32)
    finally:
        hook.remove()
    # Steps 0..19 (the 20th is index 19) take [uncond, target, average]; from index 20 [uncond, cond].
    assert batches == [3] * 20 + [2] * 10


def test_the_average_slot_is_the_target_with_the_targets_noise(tiny):
    parts = tiny[2].parts
    width = parts.text_encoder.config.hidden_size
    objective = OneActorObjective(parts.unet, parts.noise_scheduler, Projector(64, width, 16),
                                  torch.randn(2, 4, 16, 16), torch.randn(2, 64, 16, 16), torch.randn(5, 4, 16, 16),
                                  torch.randn(5, 64, 16, 16), torch.randn(3, 77, width), [[1], [2], [3]])
    example = objective.draw(torch.Generator().manual_seed(1))
    assert example.x0.shape[0] == example.noise.shape[0] == 5 and example.h.shape[0] == 4
    assert torch.equal(example.x0[-1], example.x0[0]) and torch.equal(example.noise[-1], example.noise[0])
    assert example.templates[-1] == example.templates[0]
    assert not torch.equal(example.noise[1], example.noise[0])
    loss, metrics = objective.example_loss(example)
    assert metrics["loss"] == pytest.approx(metrics["target_loss"] + 0.5 * metrics["aux_loss"]
                                            + 0.2 * metrics["average_loss"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters())


def test_the_projector_file_is_safetensors_with_its_features():
    projector = Projector(64, 32, 16)
    features = {"target": torch.randn(2, 64, 16, 16)}
    loaded, found = load_projector(projector_bytes(projector, features))
    assert torch.equal(found["target"], features["target"]) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(projector.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="not a OneActor projector"):
        load_projector(save({"x": torch.zeros(1)}))


def test_a_resumed_tuning_equals_an_uninterrupted_one_and_the_cluster_is_shared(tmp_path):
    config = tiny_config(oneactor=ONEACTOR)
    straight = ingested_catalog(tmp_path / "a", subjects=("red_mug",))
    done = train_oneactor(context(straight, config), load_subject(straight, "red_mug"))

    resumed = ingested_catalog(tmp_path / "b", subjects=("red_mug", "green_mug"))
    subject = load_subject(resumed, "red_mug")
    assert train_oneactor(context(resumed, config), subject, stop_after=2)["interrupted_at"] == 2
    finished = train_oneactor(context(resumed, config), subject)
    assert finished["adapter_id"] == done["adapter_id"] and finished["final_loss"] == done["final_loss"]
    a, b = (load_file(c.blob_path(r["file"])) for c, r in ((straight, done), (resumed, finished)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ctx = context(resumed, config)
    registry.tune(ctx, "oneactor", "green_mug")
    assert [m for m in ctx.made if "cluster" in m] == [] and any("mug cluster" in r for r in ctx.reused)
    assert resumed.read("clusters").num_rows == 1  # one per class, shared by both mugs


def test_generate_through_the_registry_records_the_guidance(tiny):
    catalog, config, ctx = tiny
    registry.tune(ctx, "oneactor", "red_mug")
    rows = registry.sample(ctx, "oneactor", "red_mug", "a {subject} on a beach", 2)
    assert [r["prompt"] for r in rows] == ["a mug on a beach"] * 2  # the class noun: the offset is the identity
    assert all('"eta2": 1.0' in r["params"] and r["method"] == "oneactor" for r in rows)
    assert rows[0]["sample_id"] != rows[1]["sample_id"]
    released = tiny_config(oneactor={**ONEACTOR, "preset": "released"})
    again = registry.sample(context(catalog, released), "oneactor", "red_mug", "a {subject} on a beach", 1)
    assert again[0]["sample_id"] != rows[0]["sample_id"] and '"eta2": 0.0' in again[0]["params"]
