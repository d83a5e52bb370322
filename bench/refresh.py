"""Refresh cost against catalog size: a no-change refresh and a one-new-photo refresh.

For each size N: N synthetic subjects of 3 small photos each are built into a fresh
catalog by one full `catalog-refresh` (every stage, tuning steps set to 1, tiny model,
32 px), then timed:
  no change    the same source again: every stage plans, finds everything current.
  one photo    one subject gains a photo: ingest 1 photo, re-tune that subject, rebuild
               its joint sets, retrain the joint model, re-evaluate what changed.
Times are wall seconds of `catalog_refresh` in this process (one Prefect temporary
server for the whole run), dashboard build and catalog versioning included. The
"x per 10x" column is how a time grows when N grows tenfold (1.0 = flat, 10 = linear).
"peak GiB" is this process's peak resident memory so far (sizes run smallest first).
Target: no-change refresh of 1,000 subjects under 30 s.

Run: .venv/bin/python bench/refresh.py [--sizes 10 100 1000]
     .venv/bin/python bench/refresh.py --reuse [--sizes ...]   the no-change refresh only, on
     the catalogs an earlier run left in OUT (minutes instead of half an hour at 1,000)
Writes OUT/results.json (OUT/reused.json with --reuse).
"""

from __future__ import annotations

import os

# Before Prefect is imported: thousands of task-run logs would bury the table.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry ping

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from flows.cli import heartbeats_where_watched  # noqa: E402
from flows.refresh import catalog_refresh  # noqa: E402
from subjectflow.catalog import init_catalog  # noqa: E402
from subjectflow.config import load_config  # noqa: E402

TINY = {
    "ingest": {"resolution": 64, "thumbnail_size": 32, "workers": 1, "mask": {"size": 32}},
    "train": {"steps": 1, "resolution": 32, "checkpoint_every": 1},
    "sfo": {"steps": 1},
    "negatives": {"steps": 2},
    "generate": {"steps": 1, "resolution": 32},
    "jointsets": {"resolution": 32, "sets_per_subject": 1},
    "joint": {"steps": 1, "max_references": 1},
    "evaluate": {"prompts": 1, "images_per_prompt": 2},
    "versioning": {"push": False},
}


def photo(seed: int) -> Image.Image:
    """A coloured block on a light background, different per seed."""
    rng = np.random.default_rng(seed)
    pixels = np.full((64, 64, 3), 230, np.uint8)
    pixels[16:48, 20:44] = rng.integers(0, 200, 3)
    return Image.fromarray(np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8))


def write_source(root: Path, subjects: int) -> None:
    for s in range(subjects):
        folder = root / f"product_{s:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(3):
            photo(s * 10 + p).save(folder / f"{p}.jpg", quality=90)


def timed(catalog: Path, source: Path, config) -> tuple[float, object]:
    start = time.perf_counter()
    run = catalog_refresh(str(catalog), str(source), config, str(catalog.parent / "dashboard"))
    return time.perf_counter() - start, run


def measure(size: int, out: Path) -> dict:
    work = out / f"n{size}"
    shutil.rmtree(work, ignore_errors=True)
    write_source(work / "photo_sets", size)
    config = load_config(overrides=TINY)
    catalog = init_catalog(work / "catalog", config, standalone=True).root
    initial, first = timed(catalog, work / "photo_sets", config)
    unchanged, second = timed(catalog, work / "photo_sets", config)
    photo(99_999).save(work / "photo_sets" / "product_0000" / "new.jpg", quality=90)
    one_photo, third = timed(catalog, work / "photo_sets", config)
    result = {"subjects": size, "initial_s": initial, "no_change_s": unchanged, "one_photo_s": one_photo,
              "no_change_made": len(second.record.ran), "one_photo_made": len(third.record.ran),
              "failures": [f["item"] for r in (first, second, third) for f in r.record.failures],
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(f"{size:>9} {initial:>11.1f} {unchanged:>12.1f} {one_photo:>12.1f} {len(third.record.ran):>10}"
          f" {result['peak_rss_gib']:>9.2f}"
          + (f"   FAILURES: {result['failures']}" if result["failures"] else ""), flush=True)
    return result


def no_change_again(size: int, out: Path) -> dict:
    work = out / f"n{size}"
    if not (work / "catalog").is_dir():
        raise SystemExit(f"no catalog of {size} subjects in {out}: run bench/refresh.py --sizes {size} first")
    config = load_config(overrides=TINY)
    timed(work / "catalog", work / "photo_sets", config)  # settles anything an earlier run left stale
    seconds, run = timed(work / "catalog", work / "photo_sets", config)
    print(f"{size:>9} {seconds:>12.1f} {len(run.record.ran):>10}", flush=True)
    return {"subjects": size, "no_change_s": seconds, "no_change_made": len(run.record.ran)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "refresh")
    parser.add_argument("--reuse", action="store_true", help="time only a no-change refresh of catalogs in OUT")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        print(f"{'subjects':>9} {'no change s':>12} {'items made':>10}")
        with heartbeats_where_watched():
            results = [no_change_again(size, args.out) for size in sorted(args.sizes)]
        (args.out / "reused.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    print(f"{'subjects':>9} {'initial s':>11} {'no change s':>12} {'one photo s':>12} {'items made':>10}"
          f" {'peak GiB':>9}")
    with heartbeats_where_watched():  # as the CLI runs flows
        results = [measure(size, args.out) for size in sorted(args.sizes)]
    print()
    for a, b in zip(results, results[1:]):
        decades = np.log10(b["subjects"] / a["subjects"])
        grow = lambda key: (b[key] / a[key]) ** (1 / decades)  # noqa: E731 - growth per 10x subjects
        print(f"{a['subjects']} -> {b['subjects']} subjects: no change x{grow('no_change_s'):.1f} per 10x, "
              f"one photo x{grow('one_photo_s'):.1f} per 10x")
    biggest = results[-1]
    verdict = "PASS" if biggest["no_change_s"] < 30 else "FAIL"
    print(f"target: no-change refresh of {biggest['subjects']} subjects in {biggest['no_change_s']:.1f}s "
          f"(< 30 s for 1,000): {verdict if biggest['subjects'] >= 1000 else 'not measured at 1,000'}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
