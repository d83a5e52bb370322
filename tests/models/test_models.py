"""The embedded tiny model and model loading: CPU only, offline, a few seconds."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from subjectflow.models import (
    TINY_SD, ModelNotAvailable, build_tiny_sd, ensure_tiny_sd, load_components, load_pipeline, native_resolution,
    resolve_device, resolve_model_path,
)

PROMPT = "a sks teapot on the beach"


def file_hashes(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    ensure_tiny_sd(models)
    return models


@pytest.fixture(scope="module")
def tiny_dir(models_dir) -> Path:
    return models_dir / TINY_SD


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    # Deliberately the plain diffusers call, as a user with a real model would write it.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    return np.asarray(image)


# --- building -----------------------------------------------------------------------

def test_build_is_deterministic_and_depends_on_seed(tiny_dir, tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = file_hashes(build_tiny_sd(tmp_path / "again"), "*.safetensors")
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random state is untouched
    assert set(again) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors"}
    assert again == file_hashes(tiny_dir, "*.safetensors")
    other = file_hashes(build_tiny_sd(tmp_path / "seed1", seed=1), "*.safetensors")
    assert other["unet/diffusion_pytorch_model.safetensors"] != again["unet/diffusion_pytorch_model.safetensors"]


def test_ensure_builds_once_and_leaves_no_temp_folders(tmp_path):
    first = ensure_tiny_sd(tmp_path)
    weights = first / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_tiny_sd(tmp_path) == first == tmp_path / TINY_SD
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [TINY_SD]


def test_build_refuses_a_folder_that_is_not_a_model(tmp_path):
    dest = tmp_path / TINY_SD
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model_index.json"):
        build_tiny_sd(dest)
    assert (dest / "notes.txt").read_text() == "mine"


def test_saved_folder_has_the_sd_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    # CLIP-format tokenizer files, so transformers 4's slow CLIPTokenizer can load it too.
    merges = (tiny_dir / "tokenizer" / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) > 200


# --- generation ---------------------------------------------------------------------

def test_generates_reproducible_64px_images(pipe):
    first = generate(pipe)
    assert np.array_equal(first, generate(pipe))
    assert not np.array_equal(first, generate(pipe, "a purple sks backpack in the snow"))
    assert not np.array_equal(first, generate(pipe, seed=1))
    assert first.std() > 0  # an image, not a blank


# --- tokenizer ----------------------------------------------------------------------

def test_tokenizer_is_clip_like(pipe):
    tokenizer = pipe.tokenizer
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == pipe.text_encoder.config.vocab_size
    ids = tokenizer(PROMPT).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "sks</w>", "teapot</w>", "on</w>", "the</w>", "beach</w>",
                      "<|endoftext|>"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id


def test_tokenizer_falls_back_to_bytes_and_truncates(pipe):
    tokenizer = pipe.tokenizer
    unseen = "Zebra-striped kettle, 42 ünïcode 日本"
    ids = tokenizer(unseen).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == unseen.lower().replace(" ", "")
    long_prompt = " ".join([PROMPT] * 13)
    assert len(long_prompt) > 300 and len(tokenizer(long_prompt).input_ids) > 77
    long = tokenizer(long_prompt, truncation=True).input_ids  # model_max_length applies
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id
    padded = tokenizer("a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and int(padded.max()) < len(tokenizer)


# --- attention and LoRA -------------------------------------------------------------

def test_unet_has_self_and_cross_attention_that_lora_can_adapt(tiny_dir):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    attention = {name: module for name, module in unet.named_modules() if name.endswith((".attn1", ".attn2"))}
    assert {name.rsplit(".", 1)[1] for name in attention} == {"attn1", "attn2"}
    assert all(isinstance(module, Attention) for module in attention.values())
    assert not any(module.is_cross_attention for name, module in attention.items() if name.endswith("attn1"))
    assert all(module.is_cross_attention for name, module in attention.items() if name.endswith("attn2"))

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        before = unet(latents, 10, encoder_hidden_states=text).sample
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        # PEFT starts lora_B at zero ("gaussian" only changes lora_A), so a fresh
        # adapter is the identity: training starts from the base model exactly.
        assert torch.allclose(before, unet(latents, 10, encoder_hidden_states=text).sample)
        for name, param in unet.named_parameters():
            if ".lora_B" in name:
                param.fill_(0.05)  # what a training step would do
        after = unet(latents, 10, encoder_hidden_states=text).sample
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 4 * len(attention)
    assert all(".attn1." in name or ".attn2." in name for name in adapted)
    assert all(p.requires_grad == (".lora_" in name) for name, p in unet.named_parameters())
    assert not torch.allclose(before, after, atol=1e-4)


# --- resolving and loading ----------------------------------------------------------

def test_uncached_hub_id_fails_fast_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    start = time.monotonic()
    for allow_download in (False, True):
        with pytest.raises(ModelNotAvailable) as failure:
            resolve_model_path("subjectflow-tests/no-such-model", tmp_path, allow_download=allow_download)
        message = str(failure.value)
        assert "subjectflow-tests/no-such-model" in message
        assert "hf download subjectflow-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert time.monotonic() - start < 5


def test_uncached_hub_id_needs_allow_download_even_online(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelNotAvailable, match="do not download"):
        resolve_model_path("subjectflow-tests/no-such-model", tmp_path)


def test_cached_hub_id_loads_offline(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    repo = cache / "models--subjectflow-tests--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = resolve_model_path("subjectflow-tests/tiny", tmp_path)
    assert Path(path) == (repo / "snapshots" / commit).resolve()
    pipe = load_pipeline("subjectflow-tests/tiny", tmp_path, torch.device("cpu"), torch.float32)
    assert generate(pipe).shape == (64, 64, 3)


def test_local_folders(tiny_dir, models_dir, tmp_path):
    assert resolve_model_path(str(tiny_dir), tmp_path) == str(tiny_dir)
    assert resolve_model_path(TINY_SD, models_dir) == str(tiny_dir)
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert resolve_model_path("copy", tmp_path) == str(copy)  # a folder name under models_dir
    (tmp_path / "photos").mkdir()
    with pytest.raises(ModelNotAvailable, match="not a diffusers pipeline folder"):
        resolve_model_path(str(tmp_path / "photos"), tmp_path)
    shutil.rmtree(tmp_path / "copy" / "unet")
    with pytest.raises(ModelNotAvailable, match="incomplete.*unet"):
        resolve_model_path(str(tmp_path / "copy"), tmp_path)
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model_path("./no/such/model", tmp_path)
    with pytest.raises(ModelNotAvailable, match="valid hub id"):
        resolve_model_path("not a model id", tmp_path)


def test_load_pipeline_never_writes_the_base_model(models_dir, tiny_dir):
    before = file_hashes(tiny_dir)
    pipe = load_pipeline(TINY_SD, models_dir, torch.device("cpu"), torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.safety_checker is None
    assert generate(pipe).shape == (64, 64, 3)
    assert file_hashes(tiny_dir) == before


def test_load_components_casts_all_and_freezes_text_encoder_and_vae(models_dir, tiny_dir):
    from diffusers import DDPMScheduler

    parts = load_components(TINY_SD, models_dir, torch.device("cpu"), torch.bfloat16)
    assert parts.path == str(tiny_dir)
    for frozen in (parts.text_encoder, parts.vae):
        assert not frozen.training and frozen.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in frozen.parameters())
    assert parts.unet.dtype == torch.bfloat16 and parts.unet.device.type == "cpu"
    assert all(p.requires_grad for p in parts.unet.parameters())  # the method decides what trains
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert len(parts.tokenizer) == parts.text_encoder.config.vocab_size
    with pytest.raises(AttributeError):
        parts.unet = None  # frozen dataclass


def test_resolve_device():
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_device() == (torch.device("cuda"), expected)
    else:
        assert resolve_device() == (torch.device("cpu"), torch.float32)
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        resolve_device("cpu", "float16")
    with pytest.raises(ValueError, match="CPU"):
        resolve_device("cpu", "fp16")


@pytest.mark.parametrize("pipeline, denoiser, sample_size, vae_blocks, native", [
    ("StableDiffusionPipeline", "unet", {"sample_size": 64}, 4, 512),
    ("StableDiffusionPipeline", "unet", {"sample_size": 96}, 4, 768),
    ("StableDiffusionXLPipeline", "unet", {"sample_size": 128}, 4, 1024),
    ("StableDiffusionPipeline", "unet", {"sample_size": [64, 64]}, 4, 512),
    ("StableDiffusion3Pipeline", "transformer", {"sample_size": 128}, 4, 1024),
    ("FluxPipeline", "transformer", {}, 4, 1024),  # no sample_size: FluxPipeline's default 128
])
def test_native_resolution_is_the_denoisers_sample_size_times_the_vae_factor(tmp_path, pipeline, denoiser,
                                                                             sample_size, vae_blocks, native):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    for part, config in ((denoiser, sample_size), ("vae", {"block_out_channels": [64] * vae_blocks})):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    assert native_resolution(str(tmp_path)) == native


def test_auto_resolutions_follow_the_base_model_and_numbers_stay(tiny_dir, tmp_path):
    from subjectflow.catalog import init_catalog
    from subjectflow.config import Config
    from subjectflow.training.artefacts import at_model_resolution

    assert native_resolution(str(tiny_dir)) == 64
    catalog = init_catalog(tmp_path / "catalog", Config())
    config = Config().model_copy(update={"generate": Config().generate.model_copy(update={"resolution": 48})})
    resolved = at_model_resolution(catalog, config)
    assert (resolved.train.resolution, resolved.jointsets.resolution, resolved.generate.resolution) == (64, 64, 48)
    assert at_model_resolution(catalog, resolved) is resolved  # nothing left to resolve: the model is not read


