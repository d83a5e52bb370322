"""Which E-step refiner: the dense CRF or Otsu + morphology, on masks whose truth is known.

The demo's drawn photos come with their exact subject masks. Each mask, pooled to the
cross-attention level's size (1/4 of the photo, 16x16 at SD's 64x64 latent of 512 px)
and corrupted by Gaussian noise, stands in for a token's attention map; both refiners
turn it back into a hard mask at the photo's size, guided (the CRF) by the photo's
colours. Printed: mean IoU against the exact masks and time per image, side by side.

    python bench/refine.py [--size 128] [--noise 0.1 0.3 0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subjectflow.demo_photos import DEMO_SUBJECTS, drawn_jpeg  # noqa: E402
from subjectflow.methods.concepts.em import crf_installed, iou, refine  # noqa: E402
from subjectflow.training.tokens import MAP_DOWNSCALE  # noqa: E402


def drawn_set(size: int, per_subject: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(photo [H, W, 3] uint8 as the demo writes it, exact mask [H, W] bool) pairs."""
    pairs = []
    for subject in DEMO_SUBJECTS:
        for index in range(per_subject):
            data, mask = drawn_jpeg(subject, index, size)  # the bytes ingest would read
            pairs.append((np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(mask) > 127))
    return pairs


def noisy_map(mask: np.ndarray, noise: float, rng: np.random.Generator) -> torch.Tensor:
    """[1, h, w]: the mask at the attention level's size, noised and divided by its max."""
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], MAP_DOWNSCALE)[0]
    noised = (pooled + torch.from_numpy(rng.normal(0, noise, pooled.shape)).float()).clamp_min(0)
    return noised / noised.amax().clamp_min(1e-6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="photo side in pixels (default: %(default)s)")
    parser.add_argument("--per-subject", type=int, default=4, help="drawn photos per demo subject")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="noise std on the maps")
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of N")
    args = parser.parse_args(argv)
    refiners = ["otsu"] + (["crf"] if crf_installed() else [])
    pairs = drawn_set(args.size, args.per_subject)
    print(f"{len(pairs)} drawn demo photos at {args.size} px; maps at 1/{MAP_DOWNSCALE} size"
          + ("" if crf_installed() else "; crf: pydensecrf2 is not installed"))
    print(f"{'noise':>6} " + " ".join(f"{f'IoU {r}':>10} {f's/img {r}':>11}" for r in refiners) + "  IoU crf/otsu")
    for noise in args.noise:
        rng = np.random.default_rng(0)
        maps = [noisy_map(mask, noise, rng) for _, mask in pairs]
        cells, scores = [], {}
        for how in refiners:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                hard = [refine(m, photo, how)[0] for m, (photo, _) in zip(maps, pairs)]
                best = min(best, (time.perf_counter() - start) / len(pairs))
            scores[how] = float(np.mean([iou(h, mask) for h, (_, mask) in zip(hard, pairs)]))
            cells.append(f"{scores[how]:>10.3f} {best:>11.4f}")
        ratio = f"{scores['crf'] / scores['otsu']:>12.2f}x" if "crf" in scores else ""
        print(f"{noise:>6.2f} " + " ".join(cells) + " " + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
