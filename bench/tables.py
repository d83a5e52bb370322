"""Committing a batch of subjects' rows into a large table: partitioned against one file.

For each catalog size N, `prompt_metrics` (the table that grows fastest: a row per
subject, method, prompt and metric) gets ROWS_PER_SUBJECT rows per subject; then one
engine batch's rows (BATCH subjects re-evaluated, as `wait_all` commits them) are
committed with `Catalog.commit`. Timed side by side, in the same run, with the table
stored the way it was before partitioning (one `data.parquet`, rewritten whole). "written"
is the bytes of the files the commit made: what DVC then hashes, caches and pushes.
A whole read of the table is timed too, since partitions cost readers file opens: cold
(as a fresh process finds it) and again (parts cached in memory; the one-file table is
read from disk each time).

Run: .venv/bin/python bench/tables.py [--sizes 100 1000 10000]
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from subjectflow.catalog import Catalog
from subjectflow.catalog import schemas, tables

TABLE = "prompt_metrics"
ROWS_PER_SUBJECT = 100  # e.g. 4 methods x 25 prompts, one metric
BATCH = 32  # flows/tune.py's COMMIT_EVERY


def rows_for(subjects: list[str], evaluation: str) -> pa.Table:
    n = len(subjects) * ROWS_PER_SUBJECT
    subject_ids = pa.array([s for s in subjects for _ in range(ROWS_PER_SUBJECT)])
    prompts = pa.array([f"a {{subject}} in scene {i}" for _ in subjects for i in range(ROWS_PER_SUBJECT)])
    return pa.table({
        "evaluation_id": pc.binary_join_element_wise(subject_ids, pa.repeat(pa.scalar(evaluation), n), "-"),
        "subject_id": subject_ids, "method": pa.repeat(pa.scalar("sft"), n), "metric": pa.repeat(pa.scalar("clip_t"), n),
        "prompt": prompts, "value": pa.array([random.random() for _ in range(n)]),
        "n_images": pa.repeat(pa.scalar(4, pa.int32()), n),
    }, schema=schemas.TABLES[TABLE].schema)


@contextlib.contextmanager
def layout(partitioned: bool) -> Iterator[None]:
    """The table partitioned (today) or as one file (before), for this block."""
    spec = schemas.TABLES[TABLE]  # the one registry every catalog module reads
    schemas.TABLES[TABLE] = spec if partitioned else dataclasses.replace(spec, partition_by=None)
    try:
        yield
    finally:
        schemas.TABLES[TABLE] = spec


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if not p.name.startswith(".")}


def measure(size: int, partitioned: bool, out: Path) -> dict:
    work = out / f"n{size}-{'partitioned' if partitioned else 'one-file'}"
    shutil.rmtree(work, ignore_errors=True)
    random.seed(size)
    subjects = [f"subject-{i:05d}" for i in range(size)]
    with layout(partitioned):
        catalog = Catalog.create(work, work / "dvc.yaml", work / "params.yaml")
        catalog.write(TABLE, rows_for(subjects, "first"))
        before = files(catalog.table_dir(TABLE))
        batch = rows_for(random.sample(subjects, BATCH), "again")
        start = time.perf_counter()
        catalog.commit([{TABLE: batch}])
        commit_s = time.perf_counter() - start
        after = files(catalog.table_dir(TABLE))
        tables._PARTS = tables._PartCache()  # as a fresh process finds it
        start = time.perf_counter()
        rows = catalog.read(TABLE).num_rows
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        catalog.read(TABLE)
        read_s = time.perf_counter() - start
    assert rows == (size + BATCH) * ROWS_PER_SUBJECT, rows
    written = sum(size_ for name, (size_, mtime) in after.items() if before.get(name, (None, None))[1] != mtime)
    shutil.rmtree(work)
    return {"subjects": size, "rows": rows, "partitioned": partitioned, "commit_s": commit_s,
            "written_bytes": written, "files": len(after), "cold_read_s": cold_s, "read_s": read_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "tables")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'subjects':>9} {'rows':>10} | {'commit s':>9} {'one file':>9} {'x':>6} | {'written MB':>10} "
          f"{'one file':>9} {'x':>6} | {'cold read s':>11} {'one file':>9} {'x':>6} | {'read again':>10} {'x':>6}")
    results = []
    for size in sorted(args.sizes):
        before, now = measure(size, False, args.out), measure(size, True, args.out)
        results += [before, now]
        mb = 2**20
        print(f"{size:>9} {now['rows']:>10} | {now['commit_s']:>9.3f} {before['commit_s']:>9.3f} "
              f"{now['commit_s'] / before['commit_s']:>6.2f} | {now['written_bytes'] / mb:>10.2f} "
              f"{before['written_bytes'] / mb:>9.2f} {now['written_bytes'] / before['written_bytes']:>6.2f} | "
              f"{now['cold_read_s']:>11.3f} {before['cold_read_s']:>9.3f} {now['cold_read_s'] / before['cold_read_s']:>6.2f} | "
              f"{now['read_s']:>10.3f} {now['read_s'] / before['read_s']:>6.2f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
