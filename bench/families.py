"""SFT and SFO training on the big base model families (SDXL, SD3, FLUX.1): steps/s and
peak memory through the project's objectives and loop, under the memory options a run on
one GPU needs. Run it as `bench/tune.py --arch A` (A below); tune.py's own rows compare
the pipeline with bare SD loops, which are written for SD's UNet only.

Options (--options, each a row pair SFT + SFO; SFO on the SFT LoRA fused, as train_sfo):
  base   the base weights in --precision, LoRA in fp32 (as load_components + add_lora)
  ckpt   + gradient checkpointing (train.gradient_checkpointing)
  8bit   + 8-bit AdamW (train.optimizer adamw8bit; bitsandbytes, CUDA only)

Models: tiny-sdxl, tiny-sd3, tiny-flux = the project's embedded models (CPU, 32 px);
sdxl, sd3, flux = the real denoisers' architectures (SDXL base 1.0's UNet, SD3 medium's
MMDiT, FLUX.1-dev's 12B transformer), random weights (nothing is downloaded), 1024 px.
Prompts and latents are random tensors in the family's shapes: the project encodes them
once per run, outside the training step. Flow-matching families train with their own
targets (x_t = (1-t)·x0 + t·eps, v = eps - x0). Memory: torch.cuda.max_memory_allocated
per row on CUDA; the process's RSS high-water mark on the CPU (coarse).

Run: .venv/bin/python bench/tune.py --arch tiny-flux
     python bench/tune.py --arch flux --device cuda --options base ckpt 8bit
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import diffusers
import torch
from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)

from subjectflow.config import TrainConfig
from subjectflow.methods.sfo.objective import SfoObjective
from subjectflow.methods.sft import SftObjective
from subjectflow.models.families import Prompt
from subjectflow.models.families.flux import FluxPrompt
from subjectflow.models.families.sd3 import SD3Prompt
from subjectflow.models.loading import resolve_device
from subjectflow.models.tiny import TINY_FLUX, TINY_SD3, TINY_SDXL, build_pipeline
from subjectflow.training.adapters import add_lora, fused
from subjectflow.training.loop import train
from tune import BETA, LR, PHOTOS, memory_peak, memory_start  # bench/ is on sys.path

TINY = {"tiny-sdxl": TINY_SDXL, "tiny-sd3": TINY_SD3, "tiny-flux": TINY_FLUX}

# The parts of each real denoiser's config.json that shape compute.
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD3_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
FLUX_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))


def family_of(arch: str) -> str:
    return arch.removeprefix("tiny-")


def build_denoiser(arch: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object, int]:
    """(frozen denoiser in eval mode on the device, its training scheduler, VAE factor)."""
    if arch in TINY:
        pipe = build_pipeline(seed=0, name=TINY[arch])
        denoiser = pipe.unet if family_of(arch) == "sdxl" else pipe.transformer
        scheduler, factor = pipe.scheduler, pipe.vae_scale_factor
    else:
        cls, config = {"sdxl": (UNet2DConditionModel, SDXL_UNET), "sd3": (SD3Transformer2DModel, SD3_TRANSFORMER),
                       "flux": (FluxTransformer2DModel, FLUX_TRANSFORMER)}[arch]
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
        try:
            with torch.device(device):  # initialise on the device, in the base dtype: FLUX has 12B parameters
                denoiser = cls(**config)
        finally:
            torch.set_default_dtype(previous)
        scheduler = {"sdxl": DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012, clip_sample=False),
                     "sd3": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                     "flux": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                             use_dynamic_shifting=True)}[arch]
        factor = 8
    denoiser = denoiser.to(device, dtype).eval()
    denoiser.requires_grad_(False)
    return denoiser, scheduler, factor


def random_inputs(arch: str, denoiser: torch.nn.Module, side: int, resolution: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Prompt]:
    """(positives, negatives [PHOTOS, C, side, side], a Prompt in the family's shapes)."""
    config, g = denoiser.config, torch.Generator().manual_seed(0)
    family = family_of(arch)
    channels = config.in_channels // 4 if family == "flux" else config.in_channels  # FLUX packs 2x2 patches

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    latents, negatives = randn(PHOTOS, channels, side, side), randn(PHOTOS, channels, side, side)
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        prompt = Prompt(randn(1, 77, config.cross_attention_dim), randn(1, pooled), size.to(device))
    elif family == "sd3":
        prompt = SD3Prompt(randn(1, 77 + 256, config.joint_attention_dim), randn(1, config.pooled_projection_dim))
    else:
        prompt = FluxPrompt(randn(1, 512, config.joint_attention_dim), randn(1, config.pooled_projection_dim))
    return latents, negatives, prompt


def time_row(objective, config: TrainConfig, args: argparse.Namespace, device: torch.device,
             autocast: torch.dtype | None, work: Path) -> float:
    """Steps/s between train()'s on_step callbacks after the warm-up (one fresh run)."""
    warmup, total, stamps = args.warmup, args.warmup + args.steps, {}

    def on_step(step: int, _row: dict) -> None:
        if step in (warmup, total):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps[step] = time.perf_counter()

    shutil.rmtree(work, ignore_errors=True)
    train(objective, config, work, total, LR, autocast, device, on_step=on_step)
    shutil.rmtree(work, ignore_errors=True)
    return args.steps / (stamps[total] - stamps[warmup])


def run_option(args: argparse.Namespace, option: str, denoiser, scheduler, latents, negatives, prompt: Prompt,
               device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    config = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size,
                         checkpoint_every=args.warmup + args.steps + 1,
                         gradient_checkpointing=option in ("ckpt", "8bit"),
                         optimizer="adamw8bit" if option == "8bit" else "adamw")
    autocast = None if dtype == torch.float32 else dtype
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        denoiser.train()
    def measured(objective) -> dict:
        start = memory_start(device)
        rate = time_row(objective, config, args, device, autocast, args.out / "work")
        peak = memory_peak(device)
        return {"steps_per_s": rate, "peak_mib": peak / 2**20, "above_start_mib": (peak - start) / 2**20}

    rows = {}
    try:
        sft = add_lora(denoiser, args.rank_sft, "sft", seed=0)
        rows["SFT"] = measured(SftObjective(denoiser, scheduler, latents, prompt, sft, args.batch_size, "sft"))
        with fused(denoiser, "sft"):  # as train_sfo: the reference is the base with the SFT LoRA merged
            sfo = add_lora(denoiser, args.rank_sfo, "sfo", seed=1)
            rows["SFO"] = measured(SfoObjective(denoiser, scheduler, latents, negatives, prompt, sfo, BETA,
                                                args.batch_size))
            denoiser.delete_adapters("sfo")
    finally:
        if config.gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
            denoiser.eval()
    return rows


def run(args: argparse.Namespace) -> None:
    """bench/tune.py's entry for the family architectures (its parsed arguments)."""
    t0 = time.perf_counter()
    if args.arch not in TINY and not args.device.startswith("cuda"):
        raise SystemExit(f"--arch {args.arch} is the real architecture, for --device cuda (FLUX's 12B parameters "
                         f"are 48 GB in fp32); on the CPU use --arch tiny-{family_of(args.arch)}")
    if "8bit" in args.options and not args.device.startswith("cuda"):
        raise SystemExit("--options 8bit needs --device cuda (bitsandbytes' 8-bit AdamW is CUDA only)")
    if "8bit" in args.options and importlib.util.find_spec("bitsandbytes") is None:
        print("8bit: left out, bitsandbytes is not installed (pip install bitsandbytes)")
        args.options = [o for o in args.options if o != "8bit"]
    device, dtype = resolve_device(args.device, args.precision)
    denoiser, scheduler, factor = build_denoiser(args.arch, device, dtype)
    side = args.resolution // factor
    latents, negatives, prompt = random_inputs(args.arch, denoiser, side, args.resolution, device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    params = sum(p.numel() for p in denoiser.parameters())
    print(f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{args.arch}: {type(denoiser).__name__} {params / 1e6:,.1f}M parameters, {args.precision}, "
          f"{args.resolution} px (latent {side}), batch {args.batch_size}, LoRA r{args.rank_sft} SFT / "
          f"r{args.rank_sfo} SFO, {args.steps} steps after {args.warmup} warm-up")
    print(f"{'option':<8}{'row':<6}{'steps/s':>9}{'s/step':>9}{'peak MiB':>11}{'+MiB':>9}")
    rows = {}
    for option in args.options:
        for row, r in run_option(args, option, denoiser, scheduler, latents, negatives, prompt, device,
                                 dtype).items():
            rows[f"{option} {row}"] = r
            print(f"{option:<8}{row:<6}{r['steps_per_s']:9.3f}{1 / r['steps_per_s']:9.2f}{r['peak_mib']:11.0f}"
                  f"{r['above_start_mib']:9.0f}", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "device": name, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "parameters": params, "rows": rows,
               "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'} ({results['wall_s']:.0f} s)")
