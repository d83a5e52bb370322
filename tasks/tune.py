"""Tuning tasks over the method registry: plan what is stale, tune, make negatives, sample.

Work that holds a model takes a device slot (one per GPU, one on a CPU-only machine),
so mapped subjects queue for devices instead of fighting over memory.
"""

from __future__ import annotations

import contextlib
import queue
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.runtime import task_run
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ThreadPoolTaskRunner

from subjectflow.catalog import Catalog
from subjectflow.catalog.blobstore import BlobStore
from subjectflow.config import Config
from subjectflow.methods import registry
from subjectflow.methods.base import Context
from subjectflow.methods.registry import TuneOutcome

GPU_LIMIT = "subjectflow-gpu"
SLOT_TIMEOUT_S = 6 * 3600  # longer than any one subject's tuning; then fail, never hang


def device_slots() -> int:
    return torch.cuda.device_count() or 1


def _device_queue() -> queue.Queue[int]:
    free: queue.Queue[int] = queue.Queue()
    for index in range(device_slots()):
        free.put(index)
    return free


# This process's free devices: a slot is a concrete GPU, so two tasks never share one.
_free_devices = _device_queue()


def device_task_runner() -> ThreadPoolTaskRunner:
    """A worker thread per device for flows that map model tasks over subjects.

    Prefect's default pool starts a thread per submitted task. The tasks queue for a
    device slot anyway, so 2,000 mapped subjects meant 2,000 live threads, each keeping
    its own native torch and malloc state: a 1,000-subject refresh grew past 23 GB.
    """
    return ThreadPoolTaskRunner(max_workers=device_slots())


def _uses_server() -> bool:
    """True when runs report to a Prefect server (deployments, `prefect server start`).

    Without one, the CLI's temporary server keeps its database but runs no lease-expiry
    service, so a slot held by a killed run would never come back; a single process
    needs no server-side limit anyway.
    """
    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def _server_slot() -> Iterator[None]:
    try:
        with concurrency(GPU_LIMIT, occupy=1, strict=True, timeout_seconds=SLOT_TIMEOUT_S):
            yield
    except TimeoutError:
        raise TimeoutError(
            f"waited {SLOT_TIMEOUT_S}s for a '{GPU_LIMIT}' slot; if no other run is using the devices, "
            f"a crashed run still holds one: `prefect gcl update {GPU_LIMIT} --active-slots 0`") from None


@contextlib.contextmanager
def device_slot(config: Config) -> Iterator[Config]:
    """Hold one device for the block; yields `config` placed on it (`model.device`
    "auto" becomes that slot's `cuda:i`; an explicit device is the user's choice)."""
    # Under an engine its resources place the work; a server limit sized from the driver's
    # devices would let one model task run at a time across the whole cluster.
    held = _server_slot() if config.execution.engine == "local" and _uses_server() else contextlib.nullcontext()
    with held:
        index = _free_devices.get()
        try:
            if config.model.device == "auto" and torch.cuda.device_count():
                device = config.model.model_copy(update={"device": f"cuda:{index}"})
                config = config.model_copy(update={"model": device})
            yield config
        finally:
            _free_devices.put(index)


@task(name="ensure-gpu-limit", retries=2, retry_delay_seconds=2)
def ensure_gpu_limit_task(slots: int) -> None:
    if _uses_server():
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


@dataclass
class Staged:
    """What a task on an engine worker returns: its result and the table rows it made,
    which the flow commits (workers write blobs, never tables: one writer per catalog)."""

    value: Any
    rows: dict[str, pa.Table]
    blobs: list[str]  # what it put to the blob store, for the flow to copy into the catalog first


def _on_engine_worker() -> bool:
    """Whether this process is a cluster's worker rather than the flow's own; a task the
    flow calls in-process (a plan, a one-off generate) writes its rows itself."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            get_worker()
            return True
        except ValueError:
            pass
    if "ray" in sys.modules:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    return False


def worker_catalog(catalog_root: Path, config: Config) -> Catalog:
    """The catalog a task works on: on an engine worker a staging copy (`Catalog.staging`)
    on the run's blob store, so that only the flow writes tables."""
    catalog = Catalog.open(catalog_root)
    if _on_engine_worker():
        uri = config.execution.blob_store
        catalog = catalog.staging(BlobStore(uri) if uri else None)
    return catalog


def method_context(catalog_root: Path, config: Config) -> Context:
    """The catalog, config and base model id, with the model loaded only when work needs it;
    used as `with`, so a borrowed resident model goes back when the task ends."""
    return Context.open(worker_catalog(catalog_root, config), config, say=get_run_logger().info)


def staged_result(catalog: Catalog, value: Any) -> Any:
    """A task's result, with its staged rows and blobs when it ran on an engine worker."""
    if catalog.staged is None:
        return value
    return Staged(value, catalog.staged, catalog.made)


@task(name="plan-tuning")
def stale_subjects_task(catalog_root: Path, method: str, config: Config) -> list[str]:
    with method_context(catalog_root, config) as ctx:
        return registry.stale_subjects(ctx, method)


def _tune_run_name() -> str:
    params = task_run.parameters  # a shared method's one run has no subject
    return f"tune-{params['method']}-{params['subject'] or 'all-subjects'}"


@task(name="tune", task_run_name=_tune_run_name)
def tune_task(catalog_root: Path, subject: str | None, method: str, config: Config) -> TuneOutcome:
    """One subject's artefact for `method` (or the shared one when subject is None)."""
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, registry.tune(ctx, method, subject))


@task(name="make-negatives", task_run_name="negatives-{method}-{subject}")
def negatives_task(catalog_root: Path, subject: str, method: str, config: Config) -> TuneOutcome:
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, registry.negatives(ctx, method, subject))


@task(name="learn-concepts", task_run_name="learn-concepts-{name}")
def learn_task(catalog_root: Path, name: str, sources: list[str], config: Config) -> TuneOutcome:
    """The named concept set from its sources (reused when already learned)."""
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, registry.learn(ctx, name, sources))


@task(name="generate-samples", task_run_name="generate-{subject}-{method}")
def generate_task(catalog_root: Path, subject: str | None, method: str | None, prompt: str, n: int, config: Config,
                  references: int | None = None) -> list[dict]:
    """Samples with `method`'s current artefact for the subject; method None: the base model."""
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, registry.sample(ctx, method, subject, prompt, n, references))
