"""OneActor's costs, measured in one run: tuning time against SFT on the same subject, and
sampling cost per image against plain CFG.

Tuning. Both rows run the project's shared loop (subjectflow.training.loop.train) on one
UNet and the same subject latents: "SFT" = SftObjective with a rank --rank LoRA (one
photo per step); "OneActor" = OneActorObjective, UNet frozen, projector trained, one
example (target + 3 auxiliary + the average slot) per step. Each row's s/step is its best
of --rounds interleaved rounds of --steps timed steps after --warmup; "to train" is s/step
times the method's default step count (SftConfig/TrainConfig 400, OneActorConfig 200),
an extrapolation, printed as such. OneActor's one-off costs are timed apart: the
auxiliary cluster (--aux-images base-model samples at --cluster-steps, shared by every
subject of a class) and the target features (one UNet call per photo).
The paper's claim: OneActor tunes in minutes where DreamBooth-style tuning takes far longer.

Sampling. Both rows run subjectflow.methods.oneactor.math.sample on the same initial
noise: "plain CFG" with guided_steps 0 (every step one UNet call on [uncond, cond]);
"OneActor" with the paper preset (the first 20 of 30 steps on [uncond, target, average]).
Latents out (the VAE decode is the same for both and left out). Expected ratio from UNet
batch entries: (20x3 + 10x2) / (30x2) = 1.33.

Models: tiny = the project's build_pipeline(seed=0) UNet, 64 px; sd15 = SD 1.5's UNet
architecture, random weights (speed does not depend on them; nothing is downloaded),
512 px. Latents, features and text embeddings are random tensors of the real shapes.

Run: .venv/bin/python bench/oneactor.py                   (tiny UNet, CPU, fp32)
     python bench/oneactor.py --arch sd15 --device cuda   (SD 1.5 UNet, 512 px, bf16)
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from subjectflow.config import OneActorConfig, TrainConfig
from subjectflow.methods.oneactor.math import PRESETS, OneActorObjective, Projector, mid_block_input, sample
from subjectflow.methods.sft import SftObjective
from subjectflow.training.adapters import add_lora, freeze_all_but
from subjectflow.training.loop import train
from tune import build_unet, model_arguments, resolve_model_arguments  # bench/ is on sys.path

PHOTOS, TEMPLATES, POSITIONS, SAMPLING_STEPS = 4, 8, [5], 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features(unet, latents: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """h [N, C, S, S] of latents at a low t: the shape and cost of the target features."""
    t = torch.full((latents.shape[0],), 1, device=latents.device)
    with torch.no_grad(), mid_block_input(unet) as captured:
        states = embeds.expand(latents.shape[0], -1, -1).to(unet.dtype)
        unet(latents.to(unet.dtype), t, encoder_hidden_states=states)
    return captured[-1]


def time_training(name: str, objective, args, device, autocast, work: Path) -> float:
    """Seconds per step between the loop's callbacks after warm-up."""
    stamps, total = {}, args.warmup + args.steps

    def on_step(step: int, _row: dict) -> None:
        if step in (args.warmup, total):
            sync(device)
            stamps[step] = time.perf_counter()

    shutil.rmtree(work, ignore_errors=True)
    config = TrainConfig(steps=total, checkpoint_every=total + 1)
    train(objective, config, work / name, total, 1e-4, autocast, device, on_step=on_step)
    shutil.rmtree(work, ignore_errors=True)
    return (stamps[total] - stamps[args.warmup]) / args.steps


def time_sampling(unet, embeds, width, settings, args, device) -> float:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cond, uncond = embeds[:1], embeds[1:2]
    delta = torch.randn(width, device=device)
    noise = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
    latents = noise.to(device, unet.dtype)
    sync(device)
    start = time.perf_counter()
    sample(unet, scheduler, None, cond, uncond, delta, delta, POSITIONS, settings, steps=SAMPLING_STEPS,
           latents=latents)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    unet, scheduler, device, dtype, factor = build_unet(args)
    args.latent = args.resolution // factor
    autocast = None if dtype == torch.float32 else dtype
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    photos = torch.randn(PHOTOS, 4, args.latent, args.latent, generator=g).to(device)
    aux = torch.randn(args.aux_images, 4, args.latent, args.latent, generator=g).to(device)
    embeds = torch.randn(TEMPLATES, 77, width, generator=g).to(device)

    aux_h = features(unet, aux, embeds[:1])  # also the warm-up of the timed call below
    sync(device)
    start = time.perf_counter()
    target_h = features(unet, photos, embeds[:1])
    sync(device)
    features_s = time.perf_counter() - start
    plain = replace(PRESETS["paper"], guided_steps=0)
    # The cluster is plain-CFG sampling: one image's time, scaled to its size and steps.
    per_image = time_sampling(unet, embeds, width, plain, args, device)
    cluster_s = args.aux_images * per_image * args.cluster_steps / SAMPLING_STEPS

    projector = Projector.for_unet(unet, width, sample_size=args.latent).to(device)
    oneactor = OneActorObjective(unet, scheduler, projector, photos, target_h, aux, aux_h, embeds,
                                 [POSITIONS] * TEMPLATES)
    lora = add_lora(unet, args.rank, "sft", seed=0)
    sft = SftObjective(unet, scheduler, photos, embeds[:1], lora, 1, "sft")
    rows = {"SFT": [], "OneActor": [], "plain CFG": [], "OneActor sampling": []}
    for r in range(args.rounds):
        for name in (("SFT", "OneActor") if r % 2 == 0 else ("OneActor", "SFT")):
            if name == "SFT":
                unet.enable_adapters()
                unet.set_adapters(["sft"])
            else:
                unet.disable_adapters()  # OneActor's base model is the plain UNet
            freeze_all_but(unet, "sft" if name == "SFT" else None)
            objective = sft if name == "SFT" else oneactor
            rows[name].append(time_training(name, objective, args, device, autocast, args.out / "work"))
        unet.disable_adapters()
        samplers = [("plain CFG", plain), ("OneActor sampling", PRESETS["paper"])]
        for name, settings in samplers if r % 2 == 0 else samplers[::-1]:
            rows[name].append(time_sampling(unet, embeds, width, settings, args, device))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f} s" for k, v in rows.items()), flush=True)

    best = {k: min(v) for k, v in rows.items()}
    sft_steps, oa_steps = TrainConfig().steps, OneActorConfig().steps
    result = {
        "arch": args.arch, "device": device.type, "precision": args.precision, "resolution": args.resolution,
        "s_per_step": {"SFT": best["SFT"], "OneActor": best["OneActor"]},
        "to_train_s": {"SFT": best["SFT"] * sft_steps, "OneActor": best["OneActor"] * oa_steps},
        "oneactor_one_off_s": {"target_features": features_s, "auxiliary_cluster": cluster_s},
        "sampling_s_per_image": {"plain CFG": best["plain CFG"], "OneActor": best["OneActor sampling"]},
        "rounds": rows, "projector_parameters": sum(p.numel() for p in projector.parameters()),
    }
    tuning_ratio = result["to_train_s"]["OneActor"] / result["to_train_s"]["SFT"]
    sampling_ratio = best["OneActor sampling"] / best["plain CFG"]
    result["ratios"] = {"tuning_oneactor_over_sft": tuning_ratio, "sampling_oneactor_over_cfg": sampling_ratio}
    print(f"\n{args.arch} UNet, {device.type} {args.precision}, {args.resolution} px (latent {args.latent}); "
          f"best of {args.rounds} rounds; projector {result['projector_parameters'] / 1e6:.1f}M parameters")
    print(f"{'tuning':<12}{'s/step':>9}{'steps':>7}{'to train (s, extrapolated)':>28}")
    for name, steps in (("SFT", sft_steps), ("OneActor", oa_steps)):
        print(f"{name:<12}{best[name]:9.4f}{steps:7d}{best[name] * steps:28.1f}")
    print(f"OneActor / SFT to train: {tuning_ratio:.2f}; plus one-off target features {features_s:.2f} s and "
          f"the auxiliary cluster ~{cluster_s:.1f} s ({args.aux_images} images x {args.cluster_steps} steps, "
          f"once per class)")
    print(f"sampling per image ({SAMPLING_STEPS} steps): plain CFG {best['plain CFG']:.3f} s, OneActor "
          f"{best['OneActor sampling']:.3f} s: ratio {sampling_ratio:.2f} (UNet batch entries predict 1.33)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def timing_arguments(p: argparse.ArgumentParser) -> None:
    """The model's arguments and --steps/--warmup/--rounds/--rank, for benches timed by `time_training`."""
    model_arguments(p)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row and round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2, >= 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row keeps its best (default 3)")
    p.add_argument("--rank", type=int, default=TrainConfig().lora_rank, help="LoRA rank (default 4)")


def checked_timing_arguments(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    resolve_model_arguments(args)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("need --warmup >= 1, --steps >= 1 and --rounds >= 1")
    return args


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing_arguments(p)
    p.add_argument("--aux-images", type=int, default=OneActorConfig().aux_images, help="auxiliary cluster size")
    p.add_argument("--cluster-steps", type=int, default=OneActorConfig().cluster_steps, help="its sampling steps")
    p.add_argument("--out", type=Path, default=Path("bench/out/oneactor"), help="scratch and results.json")
    return checked_timing_arguments(p)


if __name__ == "__main__":
    main()
