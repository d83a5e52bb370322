"""Scale-out: the tuning stage on Dask and Ray, engine overhead, and model loads per refresh.

Tiny model, CPU, synthetic subjects of 3 photos (bench/refresh.py's), one torch thread per
process so that workers do not fight over the cores:
  engine overhead  a tune flow that finds nothing stale (planning only): the local engine,
                   then each engine attached to a running cluster and starting its own.
  tuning           subjects/s of `tune --method sft` on SUBJECTS stale subjects: the local
                   engine (one device slot), then each engine with 1 GPU and with 2 (a Dask
                   worker per GPU resource, a Ray head with that many num_gpus); ratios
                   against the local engine, run side by side.
  model loads      base-model loads in one full `catalog-refresh`, resident models off
                   (the behaviour before models/resident.py) and on.
  blob store       subjects/s of the same tuning on 2 Dask GPUs with workers' blobs and
                   checkpoints in the catalog folder, then on an S3 store (moto on 127.0.0.1).
  task payload     bytes a cluster task carries: Prefect's serialized run context, whole
                   (it holds the flow's parameters) and as the engine ships it (without
                   them), and a tune task's own arguments, for a flow given no subject list
                   (the nightly refresh) and 1,000 or 10,000 names.

Run: .venv/bin/python -m bench.scaleout [--subjects 6] [--steps 20]  (from the repository root)
Writes OUT/results.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: workers inherit it

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cloudpickle  # noqa: E402
from distributed import LocalCluster  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.context import serialize_context  # noqa: E402

from bench.local_s3 import local_s3  # noqa: E402
from bench.refresh import TINY, write_source  # noqa: E402
from flows.engine import MODEL_RESOURCE, engine, on_engine, prefect_api, without_flow_parameters  # noqa: E402
from flows.ingest import ingest_flow  # noqa: E402
from flows.refresh import catalog_refresh  # noqa: E402
from flows.tune import tune_flow  # noqa: E402
from subjectflow.catalog import init_catalog  # noqa: E402
from subjectflow.config import Config, load_config  # noqa: E402
from subjectflow.models import resident  # noqa: E402
from subjectflow.s3 import s3_client  # noqa: E402
from subjectflow.training import artefacts  # noqa: E402


def fresh_catalog(work: Path, subjects: int, config: Config) -> str:
    shutil.rmtree(work, ignore_errors=True)
    write_source(work / "photo_sets", subjects)
    root = str(init_catalog(work / "catalog", config, standalone=True).root)
    ingest_flow(str(work / "photo_sets"), root, config)
    return root


ENGINES = ("dask", "ray")


def on(config: Config, name: str, address: str = "", blob_store: str = "") -> Config:
    return config.model_copy(update={"execution": config.execution.model_copy(
        update={"engine": name, "address": address, "blob_store": blob_store})})


@contextlib.contextmanager
def cluster(name: str, gpus: int):
    """A running cluster with `gpus` fake GPUs, as a team would keep one up."""
    if name == "dask":
        with LocalCluster(n_workers=gpus, threads_per_worker=2, processes=True, resources={MODEL_RESOURCE: 1},
                          dashboard_address=None) as running:
            yield running.scheduler_address
        return
    ray = [str(Path(sys.executable).parent / "ray")]
    subprocess.run([*ray, "start", "--head", f"--num-gpus={gpus}", f"--num-cpus={2 * gpus}",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    try:
        yield "auto"  # the running local cluster, with the auth token `ray start` made
    finally:
        subprocess.run([*ray, "stop", "--force"], check=True, capture_output=True)


def timed_tune(root: str, config: Config) -> tuple[float, int]:
    start = time.perf_counter()
    with engine(config) as placed:
        run = on_engine(tune_flow, placed)(root, "sft", None, placed)
    if run.failures:
        raise SystemExit(f"tuning failed: {run.failures}")
    return time.perf_counter() - start, len(run.outcomes)


def overhead(work: Path, config: Config) -> dict:
    root = fresh_catalog(work / "overhead", 2, config)
    timed_tune(root, config)  # everything current from here on
    seconds = {"local": timed_tune(root, config)[0]}
    for name in ENGINES:
        with cluster(name, 2) as address:
            seconds[f"{name} attached"] = timed_tune(root, on(config, name, address))[0]
        seconds[f"{name} own cluster"] = timed_tune(root, on(config, name))[0]
    return seconds


def tuning(work: Path, config: Config, subjects: int) -> dict:
    root = fresh_catalog(work / "tune-local", subjects, config)
    seconds, n = timed_tune(root, config)
    rates = {"local": n / seconds}
    for name in ENGINES:
        for gpus in (1, 2):
            root = fresh_catalog(work / f"tune-{name}-{gpus}", subjects, config)
            with cluster(name, gpus) as address:
                seconds, n = timed_tune(root, on(config, name, address))
            rates[f"{name} {gpus} GPU{'s' if gpus > 1 else ''}"] = n / seconds
    return rates


def model_loads(work: Path, config: Config, subjects: int) -> dict:
    counted = {"n": 0}

    def counting(load):
        def wrapper(*args, **kwargs):
            counted["n"] += 1
            return load(*args, **kwargs)
        return wrapper

    # Both ways a base model is loaded: per task (resident off) and into the resident cache.
    artefacts.load_components = counting(artefacts.load_components)
    resident.load_components = counting(resident.load_components)
    loads = {}
    for label, keep in (("resident off", False), ("resident on", True)):
        shutil.rmtree(work / "loads", ignore_errors=True)
        write_source(work / "loads" / "photo_sets", subjects)
        kept = config.model_copy(update={"execution": config.execution.model_copy(update={"resident_models": keep})})
        root = init_catalog(work / "loads" / "catalog", kept, standalone=True).root
        resident.RESIDENT.clear()
        counted["n"] = 0
        run = catalog_refresh(str(root), str(work / "loads" / "photo_sets"), kept, str(work / "loads" / "dashboard"))
        if run.record.failures:
            raise SystemExit(f"refresh failed: {run.record.failures}")
        loads[label] = counted["n"]
    return loads


@contextlib.contextmanager
def s3_bucket(name: str):
    """An S3 bucket on moto's HTTP server on 127.0.0.1 (what the tests use): no network in
    between, so what is measured is the store's own cost (requests, copies, the flow's copy-in)."""
    with local_s3():  # before the cluster starts: its workers inherit the endpoint
        s3_client().create_bucket(Bucket=name)
        yield f"s3://{name}/blobs"


def blob_store(work: Path, config: Config, subjects: int) -> dict:
    """Tuning subjects/s on 2 Dask GPUs, blobs and checkpoints in the catalog folder and on
    S3, with a checkpoint every step (the store's worst case) and every 10 steps."""
    rates = {}
    with s3_bucket("bench") as uri:
        for every in (1, 10):
            checkpointing = config.model_copy(update={"train": config.train.model_copy(update={"checkpoint_every": every})})
            for label, store in (("catalog folder", ""), ("S3 store", uri)):
                root = fresh_catalog(work / f"store-{every}-{'s3' if store else 'folder'}", subjects, checkpointing)
                with cluster("dask", 2) as address:
                    seconds, n = timed_tune(root, on(checkpointing, "dask", address, store))
                rates[f"{label}, checkpoint every {every}"] = n / seconds
    return rates


@task
def _noop(root: str, subject: str, method: str, config: Config) -> None:
    pass


@flow
def _context_bytes(catalog: str, subjects: list[str] | None, config: Config) -> tuple[int, int, int]:
    arguments = {"root": catalog, "subject": "subject-00000", "method": "sft", "config": config}
    whole = len(cloudpickle.dumps(serialize_context()))
    with without_flow_parameters():  # what the engine's task runners ship
        shipped = len(cloudpickle.dumps(serialize_context()))
    return whole, shipped, len(cloudpickle.dumps((_noop, arguments)))


def payload(config: Config) -> dict:
    sizes = {}
    for count in (0, 1000, 10000):
        names = [f"subject-{i:05d}" for i in range(count)] or None
        sizes[count] = dict(zip(("flow_context_bytes", "shipped_context_bytes", "task_bytes"),
                                _context_bytes("catalog", names, config)))
    return sizes


PARTS = ("overhead", "tuning", "model_loads", "payload", "blob_store")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "scaleout")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(overrides={**TINY, "train": {**TINY["train"], "steps": args.steps}})
    measures = {"overhead": lambda: overhead(args.out, config),
                "tuning": lambda: tuning(args.out, config, args.subjects),
                "model_loads": lambda: model_loads(args.out, config, min(args.subjects, 6)),
                "payload": lambda: payload(config),
                "blob_store": lambda: blob_store(args.out, config, args.subjects)}
    with prefect_api():  # one Prefect server for this process and every worker
        results = {part: measures[part]() for part in args.parts}
    if "overhead" in results:
        print("engine overhead (a tune flow with nothing stale, wall s, x local)")
        local = results["overhead"]["local"]
        for label, seconds in results["overhead"].items():
            print(f"  {label:<18} {seconds:6.1f}  {seconds / local:5.2f}x")
    if "tuning" in results:
        print(f"tuning {args.subjects} subjects, sft {args.steps} steps (subjects/s, x local)")
        local = results["tuning"]["local"]
        for label, rate in results["tuning"].items():
            print(f"  {label:<18} {rate:6.2f}  {rate / local:5.2f}x")
    if "model_loads" in results:
        loads = results["model_loads"]
        print(f"base-model loads in one catalog-refresh of {min(args.subjects, 6)} subjects: "
              f"resident off {loads['resident off']}, on {loads['resident on']}")
    if "payload" in results:
        print("bytes a cluster task carries (Prefect's run context + a tune task's arguments)")
        for count, sizes in results["payload"].items():
            print(f"  flow given {count or 'no'} subject names: flow's context {sizes['flow_context_bytes'] / 1e3:.1f}"
                  f" KB, shipped {sizes['shipped_context_bytes'] / 1e3:.1f} KB, task {sizes['task_bytes'] / 1e3:.1f} KB")
    if "blob_store" in results:
        print(f"tuning {args.subjects} subjects on 2 Dask GPUs, by where workers put blobs (subjects/s, x folder)")
        for label, rate in results["blob_store"].items():
            folder = results["blob_store"][label.replace("S3 store", "catalog folder")]
            print(f"  {label:<36} {rate:6.2f}  {rate / folder:5.2f}x")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
