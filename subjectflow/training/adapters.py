"""LoRA adapters on a diffusers denoiser (a UNet, or FLUX's transformer): add, snapshot,
and save/load in diffusers' format.

Saved files are exactly what the family's pipeline's `load_lora_weights` reads
(`StableDiffusionPipeline`'s "unet." keys, SD3's and FLUX's "transformer." keys), so an
adapter from the catalog works in any plain diffusers script.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from diffusers import (FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

# Attention projections, as in diffusers' train_dreambooth_lora.py.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: UNet2DConditionModel, rank: int, adapter_name: str, seed: int,
             targets: list[str] | str = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA on `targets` (module names, or a peft regex); returns its
    parameters (fp32, whatever the base dtype)."""
    torch.manual_seed(seed)  # LoRA's random init (A matrices) must be reproducible
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def trained_adapter(unet: UNet2DConditionModel, rank: int, adapter_name: str, seed: int,
                    targets: list[str] | str = LORA_TARGETS) -> Iterator[list[torch.nn.Parameter]]:
    """A fresh trainable LoRA for the block, deleted after whatever happens: the UNet is
    resident across tasks and the next one must find it as it was."""
    params = add_lora(unet, rank, adapter_name, seed, targets)
    try:
        yield params
    finally:
        unet.delete_adapters(adapter_name)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradients collect on `module`'s weights for the block (only inputs such as new
    token rows train through it); the flags come back for methods that train it after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def freeze_all_but(unet: UNet2DConditionModel, adapter_name: str | None) -> None:
    # peft's set_adapter() marks every active adapter trainable; re-assert who trains.
    for name, p in unet.named_parameters():
        p.requires_grad_(adapter_name is not None and f".{adapter_name}." in name)


def adapter_state(unet: UNet2DConditionModel, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}


def load_adapter_state(unet: UNet2DConditionModel, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)


def _lora_format(denoiser: torch.nn.Module) -> tuple[type, str]:
    """The pipeline class whose LoRA files fit `denoiser`, and its key prefix."""
    if isinstance(denoiser, UNet2DConditionModel):
        return StableDiffusionPipeline, "unet"
    if isinstance(denoiser, SD3Transformer2DModel):
        return StableDiffusion3Pipeline, "transformer"
    return FluxPipeline, "transformer"


def lora_file_bytes(unet: UNet2DConditionModel, adapter_name: str) -> bytes:
    """The adapter as a diffusers LoRA safetensors file."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    pipeline, prefix = _lora_format(unet)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.save_lora_weights(tmp, **{f"{prefix}_lora_layers": layers}, weight_name=WEIGHT_NAME)
        return (Path(tmp) / WEIGHT_NAME).read_bytes()


def load_lora_file(unet: UNet2DConditionModel, path: Path, adapter_name: str) -> None:
    """Load a diffusers LoRA file into `unet` under `adapter_name` (frozen)."""
    pipeline, prefix = _lora_format(unet)
    state = pipeline.lora_state_dict(str(path.parent), weight_name=path.name)
    state = state[0] if isinstance(state, tuple) else state  # SD's also returns network alphas
    unet.load_lora_adapter(state, prefix=prefix, adapter_name=adapter_name)


@contextlib.contextmanager
def fused(unet: UNet2DConditionModel, adapter_name: str) -> Iterator[None]:
    """Merge a frozen LoRA into the base weights for the block, as diffusers' DPO example
    trains on a fused model: later adapters then sit on it, and "adapters disabled" is it.

    The adapter is deleted (peft skips every adapter of a merged layer, so peft's own merge
    cannot hold a second, trainable one); the base weights are restored bit for bit after,
    from a CPU copy, since a model resident across tasks must not drift by merge/unmerge.
    """
    originals: list[tuple[torch.nn.Module, torch.Tensor]] = []
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                base = module.get_base_layer()
                originals.append((base, base.weight.detach().to("cpu", copy=True)))
                base.weight += module.get_delta_weight(adapter_name).to(base.weight.dtype)
    unet.delete_adapters(adapter_name)
    try:
        yield
    finally:
        with torch.no_grad():
            for base, weight in originals:
                base.weight.copy_(weight)
