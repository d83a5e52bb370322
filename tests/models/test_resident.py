"""The resident base model: loaded once per process and device, handed back as loaded."""

from __future__ import annotations

import gc

import pytest
import torch

from flows.tune import tune_flow
from subjectflow.models import TINY_SD, ensure_tiny_sd
from subjectflow.models.resident import RESIDENT, ResidentModels
from subjectflow.training.adapters import add_lora
from tests.training.conftest import adapter_files, ingested_catalog, tiny_config


@pytest.fixture
def models_dir(tmp_path):
    ensure_tiny_sd(tmp_path)
    return tmp_path


def _denoise(parts) -> torch.Tensor:
    torch.manual_seed(0)
    latents = torch.randn(1, parts.unet.config.in_channels, 8, 8)
    text = torch.randn(1, 4, parts.unet.config.cross_attention_dim)
    with torch.no_grad():
        return parts.unet(latents, 10, encoder_hidden_states=text).sample


def test_the_second_task_on_a_device_reuses_the_loaded_model(models_dir):
    cache = ResidentModels()
    first = cache.checkout(TINY_SD, models_dir, "cpu")
    cache.checkin(first)
    second = cache.checkout(TINY_SD, models_dir, "cpu")
    assert second is first and (cache.loads, cache.hits) == (1, 1)
    # while it is borrowed, another task gets its own copy rather than sharing one
    third = cache.checkout(TINY_SD, models_dir, "cpu")
    assert third is not first and cache.loads == 2


def test_a_borrower_that_never_gives_the_model_back_does_not_block_the_cache(models_dir):
    cache = ResidentModels()
    cache.checkout(TINY_SD, models_dir, "cpu")  # e.g. a context nobody closed, then garbage
    gc.collect()
    parts = cache.checkout(TINY_SD, models_dir, "cpu")
    cache.checkin(parts)
    assert cache.checkout(TINY_SD, models_dir, "cpu") is parts and cache.loads == 2


def test_a_task_that_leaves_its_adapter_behind_hands_back_a_clean_model(models_dir):
    cache = ResidentModels()
    parts = cache.checkout(TINY_SD, models_dir, "cpu")
    before = _denoise(parts)
    for p in add_lora(parts.unet, 4, "left-behind", seed=0):
        torch.nn.init.normal_(p)  # a trained LoRA: it changes the output
    parts.unet.enable_gradient_checkpointing()
    parts.unet.train()
    assert not torch.allclose(_denoise(parts), before)
    cache.checkin(parts)

    again = cache.checkout(TINY_SD, models_dir, "cpu")
    assert again is parts and not getattr(again.unet, "peft_config", None)
    assert not again.unet.training and not again.unet.is_gradient_checkpointing
    assert torch.equal(_denoise(again), before)


def test_a_task_that_changed_the_base_weights_makes_the_next_one_load_it_fresh(models_dir):
    cache = ResidentModels()
    parts = cache.checkout(TINY_SD, models_dir, "cpu")
    before = _denoise(parts)
    with torch.no_grad():
        next(parts.unet.parameters()).add_(1.0)  # what a full fine-tune does in place
    cache.checkin(parts)

    fresh = cache.checkout(TINY_SD, models_dir, "cpu")
    assert fresh is not parts and cache.loads == 2
    assert cache.evictions == ["a task changed the base weights (a full fine-tune)"]
    assert torch.equal(_denoise(fresh), before)


def test_subjects_tuned_on_one_resident_model_get_the_adapters_a_fresh_load_gives(tmp_path):
    resident = ingested_catalog(tmp_path / "resident")
    loads = RESIDENT.loads
    assert not tune_flow(str(resident.root), "sft", None, tiny_config()).failures
    assert RESIDENT.loads - loads == 1  # two subjects, one load

    reloaded = ingested_catalog(tmp_path / "reloaded")
    run = tune_flow(str(reloaded.root), "sft", None, tiny_config(execution={"resident_models": False}))
    assert not run.failures
    assert adapter_files(resident) == adapter_files(reloaded) and len(adapter_files(resident)) == 2
