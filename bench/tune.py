"""Training speed: SFT and SFO steps/s and peak memory, the pipeline against a bare loop.

All rows share one UNet, one set of inputs and the same LoRAs ("sft" rank --rank-sft,
"sfo" rank --rank-sfo, on to_q/to_k/to_v/to_out.0, fp32 over a --precision base):
  bare SFT      written here, diffusers-style: noise, uniform t, add_noise, UNet, MSE,
                backward, AdamW step, zero_grad. Nothing else.
  pipeline SFT  subjectflow.training.loop.train(SftObjective(...)), as train_sft runs it.
  switching SFO no-grad reference pass (SFT adapter only), policy pass (SFT + SFO) on the
                stacked positive/negative batch, DPO-style loss, backward, step: the
                adapters are switched twice a step and the SFT LoRA runs in both passes.
  bare SFO      the same with the SFT LoRA fused into the base weights first, as train_sfo
                does (training.adapters.fused): reference = adapters disabled, policy = SFO.
  pipeline SFO  loop.train(SfoObjective(...)) on the fused UNet, as train_sfo runs it.
"paired" = the median over rounds of pipeline steps/s / bare steps/s in the same round (the
two run next to each other): the overhead ratio, target >= 0.95. "vs bare" = best against
best, which a drift in machine speed (common on shared VMs) can skew either way. "fused"
= the median over rounds of bare SFO / switching SFO: what fusing the reference saves.

Models: tiny = the project's build_pipeline(seed=0) UNet, 64 px -> 32x32 latents; sd15 =
SD 1.5's UNet architecture, random weights (speed does not depend on them; nothing is
downloaded), 512 px -> 64x64 latents. Latents and text embeddings are random tensors:
the project encodes them once per run, outside the training step.

Timing: --steps steps after --warmup. Pipeline rows are timed between train()'s on_step
callbacks, so one-off costs (optimizer, checkpoint lookup, the final checkpoint train()
always writes) are left out; the final checkpoint's time is printed apart. Each row keeps
its best of --rounds interleaved rounds (order reversed every other round). Each row also
records the cores other processes used meanwhile; "paired" skips rounds above QUIET.
Memory: CUDA: max_memory_allocated, reset per row. CPU: the process's RSS high-water mark
(VmHWM, reset per row via /proc/self/clear_refs): coarse, as it includes the model, Python
and allocator caches; "+MiB" is above the row's starting RSS.
TFLOP/s: one step's FLOPs (every UNet pass, forward and backward) counted once with
FlopCounterMode, times steps/s (on CPU with the math SDPA backend, which it can count).

Run: .venv/bin/python bench/tune.py                   (tiny UNet, CPU, fp32)
     python bench/tune.py --arch sd15 --device cuda   (SD 1.5 UNet, 512 px, bf16)
     python bench/tune.py --arch flux --device cuda   (SDXL, SD3, FLUX and their tiny-*: bench/families.py)
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from subjectflow.config import SfoConfig, TrainConfig
from subjectflow.methods.sfo.objective import SfoObjective
from subjectflow.methods.sft import SftObjective
from subjectflow.models.families import Prompt
from subjectflow.models.loading import resolve_device
from subjectflow.models.tiny import build_pipeline
from subjectflow.training.adapters import adapter_state, add_lora, freeze_all_but, fused, load_adapter_state
from subjectflow.training.loop import train

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json, the parts that shape compute
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
ROWS = ("bare SFT", "pipeline SFT", "switching SFO", "bare SFO", "pipeline SFO")
FUSED_ROWS = ("bare SFO", "pipeline SFO")  # run with the SFT LoRA fused into the base
LR, BETA, PHOTOS = 1e-4, 1000.0, 4
QUIET = 0.2  # CPU cores other processes may use during a row before its timing counts as under load
FAMILY_ARCHS = ("tiny-sdxl", "tiny-sd3", "tiny-flux", "sdxl", "sd3", "flux")  # run by bench/families.py


@dataclass
class Bench:
    args: argparse.Namespace
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    device: torch.device
    dtype: torch.dtype  # the base weights'; the bare loops keep it, as diffusers' weight_dtype
    latents: torch.Tensor  # [PHOTOS, 4, h, w] positives / instance photos
    negatives: torch.Tensor  # [PHOTOS, 4, h, w]
    embeds: torch.Tensor  # [1, 77, D]
    sft: list[torch.nn.Parameter]
    sfo: list[torch.nn.Parameter]

    @property
    def autocast(self) -> torch.dtype | None:  # as runs._autocast: the base dtype unless fp32
        return None if self.dtype == torch.float32 else self.dtype

    def cast(self):  # train() wraps the loss in the same autocast
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def model_arguments(p: argparse.ArgumentParser, archs: tuple[str, ...] = ("tiny", "sd15")) -> None:
    """--arch/--device/--precision/--resolution, as every model bench takes them."""
    p.add_argument("--arch", choices=archs, default="tiny", help="model (default tiny)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--resolution", type=int, help="pixels (default 64 tiny, 512 sd15)")


def resolve_model_arguments(args: argparse.Namespace) -> None:
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.resolution = args.resolution or {"tiny": 64, "sd15": 512}.get(
        args.arch, 32 if args.arch.startswith("tiny-") else 1024)  # bench/families.py's: its tiny ones, or 1024


def build_unet(args: argparse.Namespace) -> tuple[UNet2DConditionModel, DDPMScheduler, torch.device, torch.dtype, int]:
    """(frozen UNet in eval mode on the device, training scheduler, device, dtype, VAE factor)."""
    device, dtype = resolve_device(args.device, args.precision)
    if args.arch == "tiny":
        pipe = build_pipeline(seed=0)
        unet, scheduler, factor = pipe.unet, pipe.scheduler, pipe.vae_scale_factor
    else:
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: 860M parameters
            unet = UNet2DConditionModel(**SD15_UNET)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="epsilon", clip_sample=False)
        factor = 8
    unet = unet.to(device, dtype).eval()  # as load_components leaves it (from_pretrained -> eval)
    unet.requires_grad_(False)
    return unet, scheduler, device, dtype, factor


def build(args: argparse.Namespace) -> Bench:
    unet, scheduler, device, dtype, factor = build_unet(args)
    sft = add_lora(unet, args.rank_sft, "sft", seed=0)
    sfo = add_lora(unet, args.rank_sfo, "sfo", seed=1)
    g, side = torch.Generator().manual_seed(0), args.resolution // factor
    latents, negatives = (torch.randn(PHOTOS, 4, side, side, generator=g).to(device) for _ in range(2))
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device)
    return Bench(args, unet, scheduler, device, dtype, latents, negatives, embeds, sft, sfo)


# -- the bare loops: only what the method's maths needs --------------------------------

def bare_sft_step(b: Bench, opt: torch.optim.Optimizer) -> None:
    n, x0 = b.args.batch_size, b.latents[:b.args.batch_size]
    noise = torch.randn_like(x0)
    t = torch.randint(0, b.scheduler.config.num_train_timesteps, (n,), device=b.device)
    noisy = b.scheduler.add_noise(x0, noise, t)
    with b.cast():
        pred = b.unet(noisy.to(b.dtype), t, encoder_hidden_states=b.embeds.expand(n, -1, -1).to(b.dtype)).sample
    F.mse_loss(pred.float(), noise).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sfo_step(b: Bench, opt: torch.optim.Optimizer, reference_pass: Callable, policy_pass: Callable) -> None:
    n, unet = b.args.batch_size, b.unet
    noise = torch.randn_like(b.latents[:n]).repeat(2, 1, 1, 1)  # same eps and t within a pair
    last_t = b.scheduler.config.num_train_timesteps - 1
    t = (torch.sigmoid(torch.randn(n, device=b.device)) * last_t).round().long().repeat(2)  # logit-normal t
    noisy = b.scheduler.add_noise(torch.cat([b.latents[:n], b.negatives[:n]]), noise, t).to(b.dtype)
    states = b.embeds.expand(2 * n, -1, -1).to(b.dtype)
    with b.cast():
        reference_pass()
        with torch.no_grad():
            ref = unet(noisy, t, encoder_hidden_states=states).sample.float()
        policy_pass()
        policy = unet(noisy, t, encoder_hidden_states=states).sample.float()
    err_pol, err_ref = (((x - noise) ** 2).flatten(1).mean(1).chunk(2) for x in (policy, ref))
    diff = (err_pol[0] - err_pol[1]) - (err_ref[0] - err_ref[1])
    (-F.logsigmoid(-BETA * diff).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def switching_sfo_step(b: Bench, opt: torch.optim.Optimizer) -> None:
    def policy() -> None:
        b.unet.set_adapters(["sft", "sfo"])
        for p in b.sft:  # set_adapters makes every active adapter trainable; the reference stays frozen
            p.requires_grad_(False)

    sfo_step(b, opt, lambda: b.unet.set_adapters(["sft"]), policy)


def fused_sfo_step(b: Bench, opt: torch.optim.Optimizer) -> None:
    sfo_step(b, opt, b.unet.disable_adapters, b.unet.enable_adapters)


BARE = {"bare SFT": bare_sft_step, "switching SFO": switching_sfo_step, "bare SFO": fused_sfo_step}


def time_bare(b: Bench, step: Callable, params: list) -> float:
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=TrainConfig().weight_decay)  # train()'s optimizer
    for i in range(b.args.warmup + b.args.steps):
        if i == b.args.warmup:
            b.sync()
            start = time.perf_counter()
        step(b, opt)
    b.sync()
    return b.args.steps / (time.perf_counter() - start)


# -- the pipeline: the project's loop and objectives, as runs.py wires them ------------

def time_pipeline(b: Bench, method: str, work: Path) -> tuple[float, float]:
    """(steps/s, seconds of the final checkpoint) for one fresh run (train() resumes from
    any checkpoint in `work`, so it must start empty)."""
    warmup, total, n, stamps = b.args.warmup, b.args.warmup + b.args.steps, b.args.batch_size, {}
    objective = (SftObjective(b.unet, b.scheduler, b.latents, Prompt(b.embeds), b.sft, n, "sft") if method == "SFT" else
                 SfoObjective(b.unet, b.scheduler, b.latents, b.negatives, Prompt(b.embeds), b.sfo, BETA, n))

    def on_step(step: int, _row: dict) -> None:
        if step in (warmup, total):
            b.sync()
            stamps[step] = time.perf_counter()

    shutil.rmtree(work, ignore_errors=True)
    config = TrainConfig(steps=total, batch_size=n, checkpoint_every=total + 1)  # only the final checkpoint
    train(objective, config, work, total, LR, b.autocast, b.device, on_step=on_step)
    b.sync()
    end = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    return b.args.steps / (stamps[total] - stamps[warmup]), end - stamps[total]


# -- measurement -----------------------------------------------------------------------

def memory_start(device: torch.device) -> float:
    """Reset the peak and return the current figure, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError):  # Linux: "5" resets this process's VmHWM
        Path("/proc/self/clear_refs").write_text("5")
    return _proc_status("VmRSS")


def memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(field: str) -> float:
    try:  # Linux only; elsewhere the CPU figures are nan
        return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])
    except OSError:
        return float("nan")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes, by this one): the difference is other load,
    which on a small shared machine spoils timings (Linux; nan elsewhere)."""
    try:
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    except OSError:
        busy = float("nan")
    return busy, sum(os.times()[:2])


def other_cores(before: tuple[float, float], wall: float) -> float:
    """Cores other processes kept busy, on average, since `before` = cpu_seconds()."""
    after = cpu_seconds()
    return ((after[0] - before[0]) - (after[1] - before[1])) / wall


@contextlib.contextmanager
def reference_fused(b: Bench, row: str) -> Iterator[None]:
    """For FUSED_ROWS, the SFT LoRA fused into the base as train_sfo has it; put back as an
    adapter afterwards for the other rows."""
    if row not in FUSED_ROWS:
        yield
        return
    state = adapter_state(b.unet, "sft")
    with fused(b.unet, "sft"):
        yield
    b.sft = add_lora(b.unet, b.args.rank_sft, "sft", seed=0)
    load_adapter_state(b.unet, state, "sft")


def prepare(b: Bench, row: str) -> list[torch.nn.Parameter]:
    """Active adapters and trainable parameters as the method's run has them (untimed)."""
    method = row.split()[1]
    b.unet.set_adapters(["sft"] if method == "SFT" else ["sfo"] if row in FUSED_ROWS else ["sft", "sfo"])
    freeze_all_but(b.unet, method.lower())
    return b.sft if method == "SFT" else b.sfo


def run_row(b: Bench, row: str, work: Path) -> dict:
    with reference_fused(b, row):
        params = prepare(b, row)
        base, t0, cpu0 = memory_start(b.device), time.perf_counter(), cpu_seconds()
        if row in BARE:
            rate, checkpoint = time_bare(b, BARE[row], params), None
        else:
            rate, checkpoint = time_pipeline(b, row.split()[1], work)
        peak = memory_peak(b.device)
    return {"steps_per_s": rate, "peak_mib": peak / 2**20, "above_start_mib": (peak - base) / 2**20,
            "final_checkpoint_s": checkpoint, "other_cores": other_cores(cpu0, time.perf_counter() - t0)}


def count_flops(b: Bench, row: str) -> int:
    """FLOPs of one training step of a bare row (its pipeline row runs the same UNet passes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with reference_fused(b, row):
        opt = torch.optim.AdamW(prepare(b, row), lr=LR)
        math = sdpa_kernel(SDPBackend.MATH) if b.device.type == "cpu" else contextlib.nullcontext()
        with math, FlopCounterMode(display=False) as counter:
            BARE[row](b, opt)
    return counter.get_total_flops()


def paired(runs: dict[str, list[dict]], row: str, baseline: str) -> float:
    """Median over rounds of row's steps/s over baseline's in the same round (quiet rounds
    only, unless none was)."""
    pairs = [(p["steps_per_s"] / q["steps_per_s"], max(p["other_cores"], q["other_cores"]) < QUIET)
             for p, q in zip(runs[row], runs[baseline])]
    return statistics.median([ratio for ratio, ok in pairs if ok] or [ratio for ratio, _ in pairs])


def measure(b: Bench, out: Path) -> dict[str, dict]:
    """Each row's fastest round (peak memory: its largest), every round's figures, "paired"
    and "fused"."""
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}
    for r in range(b.args.rounds):
        for row in ROWS if r % 2 == 0 else ROWS[::-1]:
            runs[row].append(run := run_row(b, row, out / "work"))
            print(f"  round {r + 1} {row:<13} {run['steps_per_s']:8.3f} steps/s"
                  f"  (other processes: {run['other_cores']:.2f} cores)", flush=True)
    best = {row: {**max(rs, key=lambda x: x["steps_per_s"]), "peak_mib": max(x["peak_mib"] for x in rs),
                  "rounds": [x["steps_per_s"] for x in rs], "rounds_other_cores": [x["other_cores"] for x in rs]}
            for row, rs in runs.items()}
    for method in ("SFT", "SFO"):
        best[f"pipeline {method}"]["paired"] = paired(runs, f"pipeline {method}", f"bare {method}")
    best["bare SFO"]["fused"] = paired(runs, "bare SFO", "switching SFO")
    return best


def report(b: Bench, best: dict[str, dict], flops: dict[str, int]) -> None:
    a = b.args
    print(f"\n{a.arch} UNet, {b.device.type} {a.precision}, {a.resolution} px (latent {b.latents.shape[-1]}), "
          f"batch {a.batch_size}, LoRA r{a.rank_sft} SFT / r{a.rank_sfo} SFO, {a.steps} steps after "
          f"{a.warmup} warm-up, best of {a.rounds} rounds")
    print(f"{'row':<14}{'steps/s':>9}{'ms/step':>9}{'peak MiB':>10}{'+MiB':>7}{'vs bare':>9}{'paired':>8}"
          f"{'TFLOP/s':>9}")
    for row in ROWS:
        r, method = best[row], row.split()[1]
        bare = best[f"bare {method}"]["steps_per_s"]
        r["vs_bare"] = r["steps_per_s"] / bare if row.startswith("pipeline") else None
        r["tflop_per_s"] = flops.get(row, flops[f"bare {method}"]) * r["steps_per_s"] / 1e12
        ratios = f"{r['vs_bare']:9.3f}{r['paired']:8.3f}" if r["vs_bare"] else f"{'-':>9}{'-':>8}"
        print(f"{row:<14}{r['steps_per_s']:9.3f}{1e3 / r['steps_per_s']:9.1f}{r['peak_mib']:10.0f}"
              f"{r['above_start_mib']:7.0f}{ratios}{r['tflop_per_s']:9.4f}")
    for method in ("SFT", "SFO"):
        p = best[f"pipeline {method}"]
        verdict = "ok" if p["paired"] >= 0.95 else "BELOW TARGET"
        print(f"{method}: pipeline/bare {p['paired']:.3f} paired (target >= 0.95: {verdict}), {p['vs_bare']:.3f} best/"
              f"best; {flops[f'bare {method}'] / 1e9:.2f} GFLOP/step; final checkpoint (untimed) "
              f"{p['final_checkpoint_s']:.3f} s")
    print(f"SFO with the SFT LoRA fused: {best['bare SFO']['fused']:.3f}x the adapter-switching step's steps/s "
          f"(paired), {flops['bare SFO'] / flops['switching SFO']:.3f}x its FLOPs")
    print("memory: " + ("torch.cuda.max_memory_allocated" if b.device.type == "cuda" else
                        "process RSS high-water mark (VmHWM), reset per row; +MiB above the row's start"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(p, ("tiny", "sd15", *FAMILY_ARCHS))
    p.add_argument("--steps", type=int, help="timed steps per row and round (default 30 tiny, 20 sd15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3, >= 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row keeps its best (default 3)")
    p.add_argument("--batch-size", type=int, default=1, help="photos (SFO: pairs) per step (default 1)")
    p.add_argument("--rank-sft", type=int, default=TrainConfig().lora_rank, help="SFT LoRA rank (default 4)")
    p.add_argument("--rank-sfo", type=int, default=SfoConfig().lora_rank, help="SFO LoRA rank (default 16)")
    p.add_argument("--options", nargs="+", choices=("base", "ckpt", "8bit"), default=["base", "ckpt"],
                   help="memory options, one row pair each, for the family archs (bench/families.py)")
    p.add_argument("--out", type=Path, default=Path("bench/out/tune"), help="scratch and results.json")
    args = p.parse_args()
    resolve_model_arguments(args)
    args.steps = args.steps or (30 if args.arch == "tiny" else 5 if args.arch.startswith("tiny-") else 20)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.batch_size > PHOTOS:
        p.error(f"need --warmup >= 1, --steps >= 1, --rounds >= 1 and --batch-size <= {PHOTOS}")
    return args


def main() -> None:
    args = parse_args()
    if args.arch in FAMILY_ARCHS:  # SDXL, SD3, FLUX: the project's objectives, without the bare SD rows
        import families

        families.run(args)
        return
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    b = build(args)
    name = (torch.cuda.get_device_name(b.device) if b.device.type == "cuda"
            else f"cpu: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    print(f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    flops = {row: count_flops(b, row) for row in BARE}
    best = measure(b, args.out)
    report(b, best, flops)
    wall = time.perf_counter() - t0
    other = other_cores(cpu0, wall)
    print(f"other processes used {other:.2f} CPU cores on average meanwhile"
          + (" -- timings are under load, rerun on a quiet machine" if other > QUIET else ""))
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "device": name, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "flops_per_step": flops, "rows": best,
               "other_load_cores": other, "wall_s": wall}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
