"""JeDi cost: set-completion sampling against plain txt2img, and joint training step rate.

Sampling: seconds per generated image, denoising loop only (the VAE decode and text
encoding are the same for both and left out), same scheduler (DDIM) and steps:
  plain txt2img  one UNet call per step on [uncond, cond] (diffusers' CFG batch of 2).
  jedi K refs    subjectflow.methods.jedi.attention.complete_set with K reference latents, one new
                 image: per step one coupled call on two sets of K+1 images plus one call
                 on the new image alone (the three compositional guidance terms).
Expected cost grows with set size: about (2(K+1) + 1) / 2 UNet images per step, more once
attention over K+1 images' tokens dominates; the printed ratio is the measured one.

Training: subjectflow.training.loop.train(JointObjective) steps/s and member images/s per set
size, next to one SFT-style step on a single image (set size 1) as the baseline.

Memory (--memory-sets, default 100 and 1000): peak host RSS of encoding N synthetic sets
of 3 members (64 px, the tiny model) through encode_sets and training 5 steps on them, each
N in a fresh process, beside the MiB the latents alone would take if held in memory (what
the trainer did before they were cached on disk and read a step at a time). Flat = streamed.

Models: tiny = the project's build_pipeline(seed=0) UNet at 32x32 latents; sd15 = SD 1.5's
UNet architecture with random weights (speed does not depend on them) at 64x64 latents.
Each row keeps its best of --rounds rounds, rows interleaved.

Run: .venv/bin/python bench/joint.py                  (tiny UNet, CPU, fp32)
     python bench/joint.py --arch sd15 --device cuda  (SD 1.5 UNet, bf16)
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from subjectflow.config import TrainConfig
from subjectflow.methods.jedi.attention import complete_set, coupled
from subjectflow.methods.jedi.model import JointObjective
from subjectflow.models.loading import resolve_device
from subjectflow.models.tiny import build_pipeline
from subjectflow.training.adapters import add_lora
from subjectflow.training.loop import train
from tune import SD15_UNET  # bench/tune.py: run as a script, bench/ is on sys.path


def build(args: argparse.Namespace):
    device, dtype = resolve_device(args.device, args.precision)
    if args.arch == "tiny":
        pipe = build_pipeline(seed=0)
        unet, config, side = pipe.unet, pipe.scheduler.config, 32
    else:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**SD15_UNET)
        config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012, clip_sample=False).config
        side = 64
    unet = unet.to(device, dtype).eval()
    unet.requires_grad_(False)
    return unet, config, side, device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_txt2img(unet, scheduler, text: torch.Tensor, null: torch.Tensor, side: int, steps: int) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline denoising loop, written out."""
    dtype = next(unet.parameters()).dtype
    scheduler.set_timesteps(steps, device=text.device)
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(text.device)
    states = torch.cat([null, text]).to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = unet(x.to(dtype), t, encoder_hidden_states=states).sample.float().chunk(2)
        latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
    return latents


def time_sampling(unet, config, side, device, refs: int | None, steps: int) -> float:
    scheduler = DDIMScheduler.from_config(config)
    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    text, null = (torch.randn(1, 77, dim, generator=g).to(device) for _ in range(2))
    sync(device)
    start = time.perf_counter()
    if refs is None:
        plain_txt2img(unet, scheduler, text, null, side, steps)
    else:
        references = torch.randn(refs, 4, side, side, generator=g).to(device)
        complete_set(unet, scheduler, references, text.expand(refs, -1, -1), text, null, 1, steps, 2.0, 7.5,
                     "noised", torch.Generator().manual_seed(0))
    sync(device)
    return time.perf_counter() - start


def time_training(unet, config, side, device, set_size: int, steps: int, warmup: int) -> float:
    """Steps/s of loop.train(JointObjective) on random sets of `set_size` members."""
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(4, set_size, 4, side, side, generator=g).to(device)
    captions = torch.randn(4 * set_size, 77, unet.config.cross_attention_dim, generator=g).to(device)
    set_captions = torch.arange(4 * set_size, device=device).view(4, set_size)
    trainable = add_lora(unet, 16, "bench", seed=0)
    objective = JointObjective(unet, DDPMScheduler.from_config(config), latents, captions, set_captions, trainable,
                               adapter_name="bench")
    marks: list[float] = []

    def on_step(step: int, _row: dict) -> None:
        sync(device)
        marks.append(time.perf_counter())

    try:
        with tempfile.TemporaryDirectory() as work, coupled(unet, set_size):
            train(objective, TrainConfig(checkpoint_every=10**9), Path(work), warmup + steps, 1e-4,
                  device=device, on_step=on_step)
    finally:
        unet.delete_adapters("bench")
    return steps / (marks[-1] - marks[warmup - 1])


def memory_child(n_sets: int) -> dict:
    """Peak RSS (MiB) of encoding `n_sets` sets and 5 training steps, in this process."""
    import io
    import re

    from PIL import Image

    from subjectflow.catalog import init_catalog
    from subjectflow.config import load_config
    from subjectflow.jointsets.shards import write_shards
    from subjectflow.methods.jedi.set_latents import encode_sets
    from subjectflow.models.loading import ModelParts

    pipe = build_pipeline(seed=0)
    parts = ModelParts("tiny", pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = init_catalog(Path(tmp) / "catalog", load_config(), standalone=True)

        def png() -> bytes:
            pixels = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            return buf.getvalue()

        sets = [[{"set_id": f"set{i:05d}", "member": m, "subject_id": f"s{i % 50}", "caption": f"a photo of thing {i % 50}",
                  "image": png()} for m in range(3)] for i in range(n_sets)]
        where = write_shards(catalog, sets, shard_rows=512)
        rows = [{k: v for k, v in r.items() if k != "image"} | {"shard": where[r["set_id"]]} for s in sets for r in s]
        del sets
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure from here
        encoded = encode_sets(catalog, parts, rows, 64, "tiny")
        trainable = add_lora(pipe.unet, 4, "bench", seed=0)
        objective = JointObjective(pipe.unet, pipe.scheduler, encoded.latents, encoded.captions, encoded.set_captions,
                                   trainable, adapter_name="bench", null_caption=encoded.null_caption,
                                   known_references=True, caption_dropout=0.1, reference_dropout=0.1)
        with coupled(pipe.unet, 3) as objective.processor:
            train(objective, TrainConfig(checkpoint_every=10**9), Path(tmp) / "work", 5, 1e-4)
        peak = int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) / 1024
        held = n_sets * 3 * encoded.latents.shape[-3] * encoded.latents.shape[-2] * encoded.latents.shape[-1] * 4 / 2**20
    return {"sets": n_sets, "peak_rss_mib": peak, "latents_in_memory_mib": held}


def measure_memory(sizes: list[int]) -> list[dict]:
    import subprocess
    import sys

    results = []
    for n in sizes:
        done = subprocess.run([sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True,
                              check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-refs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "joint")
    parser.add_argument("--memory-sets", type=int, nargs="*", default=[100, 1000],
                        help="set counts for the peak-RSS measurement (default 100 1000; none to skip)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return
    unet, config, side, device = build(args)
    print(f"arch {args.arch}, device {device}, {next(unet.parameters()).dtype}, latents {side}x{side}, "
          f"{args.sample_steps} sampling steps, best of {args.rounds} rounds")

    rows = [None, *range(1, args.max_refs + 1)]
    sampling = {r: float("inf") for r in rows}
    time_sampling(unet, config, side, device, 1, 2)  # warm-up: kernels, allocator
    for _ in range(args.rounds):
        for refs in rows:
            sampling[refs] = min(sampling[refs], time_sampling(unet, config, side, device, refs, args.sample_steps))
    plain = sampling[None]
    print(f"\n{'sampling':<22}{'set size':>9}{'s/image':>10}{'vs plain':>10}")
    print(f"{'plain txt2img (CFG)':<22}{1:>9}{plain:>10.3f}{1.0:>10.2f}")
    for refs in rows[1:]:
        print(f"{f'jedi, {refs} reference(s)':<22}{refs + 1:>9}{sampling[refs]:>10.3f}{sampling[refs] / plain:>10.2f}")

    sizes = [1, *range(2, args.max_refs + 2)]
    training = {n: 0.0 for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            training[n] = max(training[n], time_training(unet, config, side, device, n, args.train_steps, args.warmup))
    print(f"\n{'training':<22}{'set size':>9}{'steps/s':>10}{'images/s':>10}{'vs size 1':>10}")
    for n in sizes:
        print(f"{'joint LoRA step':<22}{n:>9}{training[n]:>10.2f}{training[n] * n:>10.2f}{training[n] / training[1]:>10.2f}")

    memory = measure_memory(args.memory_sets)
    if memory:
        print(f"\n{'memory (tiny, CPU)':<22}{'sets':>9}{'peak RSS MiB':>14}{'latents if held MiB':>21}")
        for m in memory:
            print(f"{'encode + 5 steps':<22}{m['sets']:>9}{m['peak_rss_mib']:>14.0f}{m['latents_in_memory_mib']:>21.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"arch": args.arch, "device": str(device), "sample_steps": args.sample_steps, "memory": memory,
              "sampling_s_per_image": {"plain": plain, **{f"jedi_refs_{r}": sampling[r] for r in rows[1:]}},
              "sampling_ratio": {f"set_size_{r + 1}": sampling[r] / plain for r in rows[1:]},
              "training_steps_per_s": {f"set_size_{n}": training[n] for n in sizes}}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
