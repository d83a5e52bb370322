"""The token methods' shared machinery on the tiny model: only new rows train, the
textual-inversion files load with diffusers' own call, the masked loss reduces to the
plain one, and the cross-attention processor matches diffusers' while detaching the
start-of-text token and recording per-token maps."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from subjectflow.models.tiny import build_pipeline
from subjectflow.training.adapters import add_lora
from subjectflow.training.tokens import (
    KV_TARGETS,
    AttentionMaps,
    added_tokens,
    cross_attention,
    embed_prompts,
    masked_denoising_loss,
    textual_inversion_files,
)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(seed=0)


def test_only_the_new_rows_train_and_the_model_is_given_back(pipe):
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    before = encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(tokenizer)
    with added_tokens(tokenizer, encoder, {"<mug>": "mug", "<beach>": "beach"}) as concepts:
        start = {t: v.clone() for t, v in concepts.vectors().items()}
        mug_words = tokenizer("mug", add_special_tokens=False).input_ids
        torch.testing.assert_close(start["<mug>"], before[mug_words].mean(0))
        # weight decay moves every row an optimiser sees; restore puts the others back
        optimiser = torch.optim.AdamW(concepts.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            loss = embed_prompts(concepts, encoder, ["a photo of <mug> on <beach>"]).pow(2).mean()
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            concepts.restore_frozen_rows()
        weight = concepts.embedding.weight.detach()
        assert torch.equal(weight[:vocab], before)
        for token, i in zip(concepts.tokens, concepts.ids):
            assert not torch.equal(weight[i], start[token]), f"{token} did not train"
    assert len(tokenizer) == vocab and "<mug>" not in tokenizer.get_vocab()
    assert torch.equal(encoder.get_input_embeddings().weight, before)


def test_new_rows_train_in_fp32_beside_a_bf16_text_encoder():
    pipe = build_pipeline(seed=0)
    encoder = pipe.text_encoder.to(torch.bfloat16)
    with added_tokens(pipe.tokenizer, encoder, {"<mug>": "mug"}) as concepts:
        assert concepts.embedding.weight.dtype == torch.float32
        embeds = embed_prompts(concepts, encoder, ["a photo of <mug>"])
        embeds.sum().backward()
        assert concepts.embedding.weight.grad[concepts.ids[0]].abs().sum() > 0


def test_a_token_that_is_already_a_word_is_refused(pipe):
    with pytest.raises(ValueError, match="already words"), added_tokens(pipe.tokenizer, pipe.text_encoder, {"mug": "cup"}):
        pass


def test_textual_inversion_files_load_with_diffusers_own_call(tmp_path):
    pipe = build_pipeline(seed=0)
    with added_tokens(pipe.tokenizer, pipe.text_encoder, {"<mug>": "mug", "<beach>": "beach"}) as concepts:
        with torch.no_grad():
            concepts.embedding.weight[list(concepts.ids)] += 0.5
        learned = concepts.vectors()
        for name, blob in textual_inversion_files(concepts.vectors()).items():
            (tmp_path / name).write_bytes(blob)
    pipe.load_textual_inversion(sorted(str(p) for p in tmp_path.iterdir()))
    rows = pipe.text_encoder.get_input_embeddings().weight
    for token, vector in learned.items():
        torch.testing.assert_close(rows[pipe.tokenizer.convert_tokens_to_ids(token)], vector)


def test_the_masked_loss_reduces_to_the_plain_one():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    plain = F.mse_loss(pred, target)
    ones = torch.ones(2, 1, 32, 32)
    for norm in ("area", "image"):
        torch.testing.assert_close(masked_denoising_loss(pred, target, ones, norm), plain)
        assert masked_denoising_loss(pred, target, torch.zeros(2, 1, 32, 32), norm) == 0
    # area normalisation: a sample weighs the same whatever its subject's size
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    inside = F.mse_loss(pred[..., :4], target[..., :4])
    torch.testing.assert_close(masked_denoising_loss(pred, target, half, "area"), inside)
    torch.testing.assert_close(masked_denoising_loss(pred, target, half, "image"), inside / 2)


def _unet_inputs(pipe, batch=2, latent=32):
    torch.manual_seed(1)
    latents = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, requires_grad=True)
    return latents, torch.tensor([500] * batch), text


def test_the_processor_computes_what_diffusers_does_and_detaches_the_start_token(pipe):
    unet = pipe.unet.eval()
    latents, t, text = _unet_inputs(pipe)
    unet.set_attn_processor(AttnProcessor2_0())
    stock = unet(latents, t, text).sample
    for recorder in (None, AttentionMaps()):
        with cross_attention(unet, recorder=recorder):
            ours = unet(latents, t, text).sample
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())

    with cross_attention(unet):
        unet(latents, t, text).sample.sum().backward()
    assert torch.count_nonzero(text.grad[:, 0]) == 0
    assert torch.count_nonzero(text.grad[:, 1:]) > 0


def test_the_recorder_returns_one_map_per_token_that_sums_to_one(pipe):
    unet = pipe.unet.eval()
    latents, t, text = _unet_inputs(pipe, batch=2, latent=32)
    recorder = AttentionMaps()
    with torch.no_grad(), cross_attention(unet, recorder=recorder):
        unet(latents, t, text)
    maps = recorder.maps((32, 32))
    # the tiny UNet's only cross-attention level is 16x16: the nearest to SD's 64/4
    assert maps.shape == (2, pipe.tokenizer.model_max_length, 16, 16)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 16, 16))
    cross_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert recorder.counts == {16 * 16: len(cross_layers)}  # down, mid and up: all at 16x16 here
    recorder.clear()
    with pytest.raises(ValueError, match="no cross-attention was recorded"):
        recorder.maps((32, 32))


def test_kv_lora_sits_on_cross_attention_keys_and_values_only():
    unet = build_pipeline(seed=0).unet
    params = add_lora(unet, rank=2, adapter_name="kv", seed=0, targets=KV_TARGETS)
    assert params
    wrapped = {name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_" in name}
    assert wrapped and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in wrapped), wrapped
