"""Versioning cost against catalog size: `dvc commit` + `git commit` after one new photo.

For each size N, a fresh catalog gets N subjects' worth of content-addressed blobs
(BLOBS_PER_SUBJECT small files per subject across the kinds a refresh writes) and a first
version; then one new photo's four blobs land and the next version is timed, as `version_catalog` makes it (under the catalog lock, every
stage committed). The "x per 10x" column is how the time grows when N grows tenfold
(1.0 = flat: the cost follows what changed; 10 = linear in the catalog).

Run: .venv/bin/python bench/versioning.py [--sizes 100 1000 10000]
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from subjectflow.catalog import Catalog, init_catalog
from subjectflow.catalog.versioning import version_catalog
from subjectflow.config import load_config

# A subject's blobs after a refresh, by kind: 3 photos (original, normalised, mask,
# thumbnail each), 2 adapters, 3 negatives, 8 evaluation samples.
KINDS = {"photos": 3, "normalised": 3, "masks": 3, "thumbnails": 3, "adapters": 2, "negatives": 3, "samples": 8}
BLOBS_PER_SUBJECT = sum(KINDS.values())


def write_blobs(catalog: Catalog, rng: np.random.Generator, kinds: dict[str, int] = KINDS) -> None:
    for kind, count in kinds.items():
        for _ in range(count):
            catalog.put_blob(kind, rng.bytes(512), ".bin")


def measure(size: int, out: Path) -> dict:
    work = out / f"n{size}"
    shutil.rmtree(work, ignore_errors=True)
    catalog = init_catalog(work / "catalog", load_config(overrides={"versioning": {"push": False}}), standalone=True)
    rng = np.random.default_rng(size)
    for _ in range(size):
        write_blobs(catalog, rng)
    start = time.perf_counter()
    version_catalog(catalog, f"{size} subjects")
    first = time.perf_counter() - start

    write_blobs(catalog, rng, {"photos": 1, "normalised": 1, "masks": 1, "thumbnails": 1})  # one new photo
    start = time.perf_counter()
    version = version_catalog(catalog, "one new photo")
    one_photo = time.perf_counter() - start
    if version is None:
        raise SystemExit("the new photo's version recorded nothing")
    files = sum(not name.startswith(".") for _, _, names in os.walk(catalog.root / "blobs") for name in names)
    print(f"{size:>9} {files:>9} {first:>14.1f} {one_photo:>14.2f}", flush=True)
    return {"subjects": size, "blob_files": files, "first_version_s": first, "one_photo_s": one_photo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "versioning")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'subjects':>9} {'blobs':>9} {'first version s':>14} {'one photo s':>14}")
    results = [measure(size, args.out) for size in sorted(args.sizes)]
    for a, b in zip(results, results[1:]):
        grow = (b["one_photo_s"] / a["one_photo_s"]) ** (1 / np.log10(b["subjects"] / a["subjects"]))
        print(f"{a['subjects']} -> {b['subjects']} subjects: one photo x{grow:.1f} per 10x")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
