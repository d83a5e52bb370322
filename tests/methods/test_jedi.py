"""JeDi coupled self-attention on the tiny UNet and on a bare Attention layer, checked
against the plain model and a direct computation (METHODS.md section 2, "Verify")."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from subjectflow.methods.jedi.attention import CoupledSelfAttnProcessor, complete_set, compositional_guidance, couple_unet, coupled
from subjectflow.models.tiny import build_pipeline


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet():
    model = build_pipeline(seed=0).unet.float().eval()
    model.requires_grad_(False)
    return model


def denoise(unet, latents: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """One UNet call with per-image timesteps and captions fixed by `seed`."""
    batch = latents.shape[0]
    timesteps = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed))
    text = randn(batch, 77, 32, seed=seed + 1)
    with torch.no_grad():
        return unet(latents, timesteps, encoder_hidden_states=text).sample


def perturbed(latents: torch.Tensor, j: int) -> torch.Tensor:
    out = latents.clone()
    out[j] += randn(*latents.shape[1:], seed=99)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_set_size_one_reproduces_the_plain_model(unet):
    latents = randn(2, 4, 16, 16, seed=0)
    plain = denoise(unet, latents)
    with coupled(unet, 1):
        single = denoise(unet, latents)
    torch.testing.assert_close(single, plain, atol=1e-5, rtol=0)


def test_coupling_lets_one_image_change_another(unet):
    latents = randn(3, 4, 16, 16, seed=0)
    i, j = 0, 2
    plain = max_diff(denoise(unet, latents)[i], denoise(unet, perturbed(latents, j))[i])
    with coupled(unet, 3):
        joint = max_diff(denoise(unet, latents)[i], denoise(unet, perturbed(latents, j))[i])
    assert plain < 1e-7
    assert joint > 1e-4


def test_guidance_halves_never_mix(unet):
    latents = randn(6, 4, 16, 16, seed=0)  # [uncond set of 3, cond set of 3]
    with coupled(unet, 3):
        base = denoise(unet, latents)
        moved = denoise(unet, perturbed(latents, 4))
    for i in range(3):
        assert max_diff(base[i], moved[i]) < 1e-7, f"image {i} of the first set saw the second set"
    for i in (3, 5):
        assert max_diff(base[i], moved[i]) > 1e-4, f"image {i} did not see image 4 of its own set"


def test_batch_must_hold_whole_sets(unet):
    with coupled(unet, 3), pytest.raises(ValueError, match="not a multiple of set_size 3"):
        denoise(unet, randn(2, 4, 16, 16, seed=0))


def test_cross_attention_is_refused():
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="self-attention"):
        CoupledSelfAttnProcessor(2)(attn, randn(2, 5, 8, seed=0), randn(2, 3, 6, seed=1))


@pytest.mark.parametrize("set_size", [0, -1, 1.0, True])
def test_set_size_must_be_a_positive_int(set_size):
    with pytest.raises(ValueError, match="set_size"):
        CoupledSelfAttnProcessor(set_size)


def test_processors_are_restored_and_attn2_never_replaced(unet):
    before = unet.attn_processors
    assert any(k.endswith("attn1.processor") for k in before)
    assert any(k.endswith("attn2.processor") for k in before)
    with coupled(unet, 2):
        during = unet.attn_processors
        for key, proc in during.items():
            if key.endswith("attn1.processor"):
                assert isinstance(proc, CoupledSelfAttnProcessor) and proc.set_size == 2
            else:
                assert proc is before[key], key
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(type(after[k]) is type(before[k]) for k in before)
    assert not any(isinstance(p, CoupledSelfAttnProcessor) for p in after.values())


def test_couple_unet_returns_what_restores(unet):
    before = {k: type(p) for k, p in unet.attn_processors.items()}
    _, previous = couple_unet(unet, 2)
    assert {k: type(p) for k, p in previous.items()} == before
    unet.set_attn_processor(previous)
    assert {k: type(p) for k, p in unet.attn_processors.items()} == before


def test_restored_after_an_error_inside_the_block(unet):
    with pytest.raises(RuntimeError), coupled(unet, 2):
        raise RuntimeError("boom")
    assert not any(isinstance(p, CoupledSelfAttnProcessor) for p in unet.attn_processors.values())


def manual_coupled(attn: Attention, x: torch.Tensor, set_size: int) -> torch.Tensor:
    """Written out: per set, K/V over the set's concatenated tokens, per-head softmax, out projection."""
    heads, outputs = attn.heads, []
    for start in range(0, x.shape[0], set_size):
        members = x[start:start + set_size]
        tokens = members.reshape(1, -1, x.shape[-1])  # [1, set*L, C]
        k, v = attn.to_k(tokens)[0], attn.to_v(tokens)[0]
        for image in members:
            q = attn.to_q(image)
            d = q.shape[-1] // heads
            per_head = []
            for h in range(heads):
                qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
                weights = torch.softmax(qh @ kh.T / d ** 0.5, dim=-1)
                per_head.append(weights @ vh)
            outputs.append(attn.to_out[0](torch.cat(per_head, dim=-1)))
    return torch.stack(outputs)


def test_matches_a_direct_computation():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = randn(4, 5, 8, seed=0)  # two sets of two images, five tokens each
    with torch.no_grad():
        got = CoupledSelfAttnProcessor(2)(attn, x)
        want = manual_coupled(attn, x, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_four_d_input_group_norm_residual_and_rescale():
    """Image-shaped input, group norm, residual and rescale as AttnProcessor2_0 applies them:
    set size 1 equals it, and set size 2 equals the direct computation on the normed tokens."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, norm_num_groups=2, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    x = randn(4, 8, 3, 3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(CoupledSelfAttnProcessor(1)(attn, x), AttnProcessor2_0()(attn, x),
                                   atol=1e-6, rtol=0)
        got = CoupledSelfAttnProcessor(2)(attn, x)
        tokens = x.flatten(2).transpose(1, 2)
        normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        want = (manual_coupled(attn, normed, 2) + tokens) / 2.0
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(x.shape), atol=1e-6, rtol=0)


def test_spatial_norm_with_set_size_one_equals_the_plain_processor():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=4, spatial_norm_dim=3).eval()
    x, temb = randn(2, 32, 2, 2, seed=0), randn(2, 3, 2, 2, seed=1)
    with torch.no_grad():
        got = CoupledSelfAttnProcessor(1)(attn, x, temb=temb)
        want = AttnProcessor2_0()(attn, x, temb=temb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# -- set completion -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler

    pipeline = build_pipeline(seed=0)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def embed(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def complete(pipe, references, image_scale=2.0, text_scale=5.0, mode="noised", steps=4):
    return complete_set(pipe.unet, pipe.scheduler, references, embed(pipe, "a photo of a mug").expand(len(references), -1, -1),
                        embed(pipe, "a mug on the beach"), embed(pipe, ""), 1, steps, image_scale, text_scale, mode,
                        torch.Generator().manual_seed(0))


def test_compositional_guidance_is_the_methods_formula():
    e_none, e_image, e_full = randn(3, seed=1), randn(3, seed=2), randn(3, seed=3)
    got = compositional_guidance(e_none, e_image, e_full, 1.5, 4.0)
    torch.testing.assert_close(got, e_none + 1.5 * (e_image - e_none) + 4.0 * (e_full - e_image))


def test_without_references_and_unit_image_scale_it_is_plain_classifier_free_guidance(pipe):
    want = pipe("a mug on the beach", num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = complete(pipe, torch.zeros(0, 4, 16, 16), image_scale=1.0, text_scale=5.0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_references_steer_the_new_image_only_through_the_image_terms(pipe):
    refs, other = randn(2, 4, 16, 16, seed=5), randn(2, 4, 16, 16, seed=6)
    assert max_diff(complete(pipe, refs), complete(pipe, other)) > 1e-3
    # s_I = s_T = 0 leaves only e(z, ∅, ∅): the references must not matter at all.
    torch.testing.assert_close(complete(pipe, refs, 0.0, 0.0), complete(pipe, other, 0.0, 0.0), atol=0, rtol=0)


def test_clean_and_noised_reference_slots_differ_and_bad_modes_are_refused(pipe):
    refs = randn(1, 4, 16, 16, seed=5)
    assert max_diff(complete(pipe, refs, mode="clean"), complete(pipe, refs, mode="noised")) > 1e-4
    with pytest.raises(ValueError, match="reference_mode"):
        complete(pipe, refs, mode="sharp")


def test_joint_training_shows_clean_known_references_and_drops_captions_and_references(unet):
    """Each step is a set-completion problem: 1..N-1 clean known members at t=0 and no loss
    on them, noisy members' captions sometimes empty, and some steps single images alone."""
    from diffusers import DDPMScheduler

    from subjectflow.methods.jedi.attention import coupled
    from subjectflow.methods.jedi.model import JointObjective

    g = torch.Generator().manual_seed(0)
    sets, size = 4, 3
    latents = torch.randn(sets, size, 4, 8, 8, generator=g)
    captions = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)  # two captions, then the empty one
    seen = []
    hook = unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone(),
                                              objective.processor.set_size)), with_kwargs=True)
    objective = JointObjective(unet, DDPMScheduler(num_train_timesteps=1000), latents, captions,
                               torch.zeros(sets, size, dtype=torch.long), [], adapter_name=None, null_caption=2,
                               known_references=True, caption_dropout=0.5, reference_dropout=0.3)
    try:
        with coupled(unet, size) as objective.processor:
            losses = [objective.loss(torch.Generator().manual_seed(i))[0] for i in range(40)]
    finally:
        hook.remove()
    assert all(torch.isfinite(loss) for loss in losses)
    alone = [s for s in seen if s[3] == 1]
    assert 4 <= len(alone) <= 20  # ~30% of the steps
    for noisy, t, states, set_size in alone:
        assert noisy.shape[0] == 1 and torch.equal(states[0], captions[2])  # one image, empty text
    dropped = 0
    for noisy, t, states, set_size in (s for s in seen if s[3] == size):
        clean = [i for i in range(size) if t[i] == 0 and any(torch.equal(noisy[i], x) for x in latents.flatten(0, 1))]
        assert 1 <= len(clean) <= size - 1  # known references, exactly clean, never the whole set
        assert all(not torch.equal(states[i], captions[2]) for i in clean)  # only noisy members lose their caption
        dropped += sum(torch.equal(states[i], captions[2]) for i in range(size) if i not in clean)
    assert dropped > 0


def test_clean_references_reach_the_unet_unscaled_under_an_euler_scheduler(pipe):
    from diffusers import EulerDiscreteScheduler

    refs = randn(2, 4, 16, 16, seed=5)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    try:
        complete_set(pipe.unet, euler, refs, embed(pipe, "a photo of a mug").expand(2, -1, -1),
                     embed(pipe, "a mug on the beach"), embed(pipe, ""), 1, 3, 2.0, 5.0, "clean",
                     torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    sets = [x for x in inputs if x.shape[0] == 2 * 3]  # [refs; new] twice per step
    assert sets and all(torch.equal(x[:2], refs) and torch.equal(x[3:5], refs) for x in sets)
    assert euler.init_noise_sigma > 1  # Euler scales its noisy inputs: the references must not be
