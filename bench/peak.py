"""The device's measured matmul peak, and bench/gpu.sh's summary against it.

`measure`: the best of --rounds square matmuls of side --side in bf16 on CUDA (fp32 on
CPU), TFLOP/s = 2 n^3 / s. `summary OUT`: reads OUT/peak.json and the benches'
results.json files there and prints each training row's achieved TFLOP/s as a share of
that peak, with peak GPU memory.

Run: python bench/peak.py measure --device cuda --out bench/out/gpu
     python bench/peak.py summary bench/out/gpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def measure(device: str, side: int, rounds: int) -> dict:
    target = torch.device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    a, b = (torch.randn(side, side, device=target, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms kernels and clocks up
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        best = min(best, (time.perf_counter() - start) / 10)
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dtype), "side": side, "tflop_per_s": 2 * side**3 / best / 1e12}


def summary(out: Path) -> None:
    peak = json.loads((out / "peak.json").read_text())
    print(f"\n{peak['device']}: measured {peak['dtype']} matmul peak {peak['tflop_per_s']:.1f} TFLOP/s "
          f"({peak['side']}x{peak['side']})")
    tune = json.loads((out / "tune" / "results.json").read_text())
    print(f"{'training row':<16}{'steps/s':>9}{'peak MiB':>10}{'TFLOP/s':>9}{'of peak':>9}")
    for row, r in tune["rows"].items():
        print(f"{row:<16}{r['steps_per_s']:9.2f}{r['peak_mib']:10.0f}{r['tflop_per_s']:9.2f}"
              f"{r['tflop_per_s'] / peak['tflop_per_s']:9.1%}")
    joint = json.loads((out / "joint" / "results.json").read_text())
    print("jedi sampling vs plain: " + ", ".join(f"{k} {v:.2f}x" for k, v in joint["sampling_ratio"].items()))
    print("jedi training steps/s: " + ", ".join(f"{k} {v:.2f}" for k, v in joint["training_steps_per_s"].items()))
    oneactor = json.loads((out / "oneactor" / "results.json").read_text())
    ratios = oneactor["ratios"]
    print(f"oneactor: to train {ratios['tuning_oneactor_over_sft']:.2f}x SFT's time, sampling "
          f"{ratios['sampling_oneactor_over_cfg']:.2f}x plain CFG per image")
    tokens = json.loads((out / "tokens" / "results.json").read_text())
    per_step, ratios, em = tokens["s_per_step"], tokens["ratios"], tokens["concepts"]
    print("detex training steps/s: " + ", ".join(f"{k} {1 / per_step[k]:.2f}" for k in ("SFT", "DETEX"))
          + f" ({ratios['detex_over_sft_per_step']:.2f}x SFT's time per step)")
    refine = ", ".join(f"{k} {'not installed' if v is None else f'{v:.4f} s'}"
                       for k, v in tokens["refine_s_per_image"].items())
    print(f"concepts training steps/s: {1 / per_step['Concepts']:.2f} ({ratios['concepts_over_sft_per_step']:.2f}x "
          f"SFT's time per step); E-step {em['e_step_s']:.3f} s ({em['e_step_s_per_photo']:.3f} s per photo, "
          f"{em['refiner']}); refinement per image: {refine}")
    for results in sorted(out.glob("*/results.json")):  # bench/families.py's (sdxl, flux), through tune.py --arch
        found = json.loads(results.read_text())
        if "parameters" not in found:
            continue
        print(f"{found['args']['arch']} training ({found['parameters'] / 1e6:,.1f}M parameters, "
              f"{found['args']['resolution']} px): "
              + ", ".join(f"{row} {r['steps_per_s']:.2f} steps/s {r['peak_mib']:.0f} MiB"
                          for row, r in found["rows"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="the matmul peak, into OUT/peak.json")
    m.add_argument("--device", default="cuda")
    m.add_argument("--side", type=int, default=8192)
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary", help="the benches' figures against the peak")
    s.add_argument("out", type=Path)
    args = p.parse_args()
    if args.command == "measure":
        result = measure(args.device, args.side, args.rounds)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "peak.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['device']}: {result['tflop_per_s']:.2f} TFLOP/s ({result['dtype']} matmul)")
    else:
        summary(args.out)


if __name__ == "__main__":
    main()
