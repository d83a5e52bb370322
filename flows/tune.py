"""Tuning flows over the method registry: tune, negatives and generate, each ending in a
catalog version. Which methods exist and what each needs is the registry's business."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.engine import forget_results, limit_devices, model_work, on_workers, workers_store
from flows.ingest import config_for
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.catalog.blobstore import BlobStore
from subjectflow.config import Config
from subjectflow.methods import registry
from subjectflow.methods.registry import TuneOutcome
from tasks.tune import (
    Staged, device_task_runner, generate_task, learn_task, negatives_task, stale_subjects_task, tune_task,
)

COMMIT_EVERY = 32  # staged task results per locked write during a long stage


@dataclass
class TuneRun:
    outcomes: list[TuneOutcome] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # subject -> why
    version: CatalogVersion | None = None
    made: str = "tuned {n} subject(s)"  # what the run made, for its summary

    def summary(self) -> str:
        lines = [f"{self.made.format(n=len(self.outcomes))}, {len(self.failures)} failed"]
        lines += [f"  {o.summary()}" for o in self.outcomes]
        lines += [f"  FAILED {subject}: {why}" for subject, why in self.failures.items()]
        return "\n".join(lines)


def wait_all(futures, labels: list[str], catalog_root: Path, config: Config) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait for every future: (results, failures) by label. One failure is reported,
    never fatal to the others: the task's own error, or the engine's when it gave the task
    up (Dask's KilledWorker after workers died under it, whose task run never finished).
    Rows staged by engine workers are committed here, COMMIT_EVERY tasks to one locked write,
    so a crash of a long stage loses at most one batch; then their kept results go, and so
    do failed tasks' (Prefect keeps the error too)."""
    results, failures, staged, kept, failed = {}, {}, [], [], []
    for label, future in zip(labels, futures):
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - each subject's failure is reported, the rest go on
            failures[label] = f"{type(exc).__name__}: {exc}"
            failed.append(future)
            continue
        if isinstance(result, Staged):
            staged.append(result)
            kept.append(str(future.task_run_id))
            result = result.value
        results[label] = result
        if len(staged) >= COMMIT_EVERY:
            _commit(catalog_root, config, staged, kept)
            staged, kept = [], []
    if staged:
        _commit(catalog_root, config, staged, kept)
    _forget_errors(catalog_root, config, failed)
    return results, failures


def _commit(catalog_root: Path, config: Config, staged: list[Staged], kept: list[str]) -> None:
    store = workers_store(config)
    Catalog.open(catalog_root).commit([s.rows for s in staged], [rel for s in staged for rel in s.blobs],
                                      BlobStore(store) if store else None)
    forget_results(config, catalog_root, kept)


def _forget_errors(catalog_root: Path, config: Config, failed: list) -> None:
    """Delete failed tasks' persisted errors, which Prefect keeps under keys of their own. A
    server or store that cannot be reached leaves them behind; it never costs the stage."""
    try:
        forget_results(config, catalog_root, [key for key in map(_error_key, failed) if key])
    except Exception as exc:  # noqa: BLE001 - a cleanup, after every failure was reported
        logging.getLogger(__name__).warning("failed tasks' kept errors not deleted: %s", exc)


def _error_key(future) -> str | None:
    data = future.state.data  # read once: for a task the engine gave up on, it asks the server
    return getattr(getattr(data, "metadata", data), "storage_key", None)


def _collect(futures, subjects: list[str], root: Path, config: Config, made: str = TuneRun.made) -> TuneRun:
    results, failures = wait_all(futures, subjects, root, config)
    return TuneRun(list(results.values()), failures, made=made)


def _finish(root: Path, run: TuneRun, config: Config) -> TuneRun:
    get_run_logger().info(run.summary())
    if any(o.made for o in run.outcomes):
        run.version = version_run(root, run.summary(), config.versioning)
    return run


@flow(name="tune", log_prints=True, task_runner=device_task_runner())
def tune_flow(catalog: str, method: str, subjects: list[str] | None = None, config: Config | None = None) -> TuneRun:
    """Make `method`'s artefact for the given subjects, or for every subject whose one is
    missing or stale; a shared method's one artefact is made once for all of them."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    return _finish(root, _tune(root, method, subjects, config), config)


def _tune(root: Path, method: str, subjects: list[str] | None, config: Config) -> TuneRun:
    if registry.get(method).shared:
        with model_work(config, registry.get(method).devices(config)):
            futures = [on_workers(tune_task, config, root).submit(root, None, method, config)]
        return _collect(futures, [method], root, config)
    todo = subjects if subjects else stale_subjects_task(root, method, config)
    with model_work(config):
        futures = on_workers(tune_task, config, root).map(unmapped(root), todo, unmapped(method), unmapped(config))
    return _collect(futures, todo, root, config)


@flow(name="tune-methods", log_prints=True, task_runner=device_task_runner())
def tune_methods_flow(catalog: str, methods: list[str], subjects: list[str] | None = None,
                      config: Config | None = None) -> TuneRun:
    """Several methods in registry order, so what one needs is made before it; one version."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    run = TuneRun()
    for method in registry.targets(config, methods):
        part = _tune(root, method, subjects, config)
        run.outcomes += part.outcomes
        run.failures.update({f"{label} ({method})": why for label, why in part.failures.items()})
    return _finish(root, run, config)


@flow(name="negatives", log_prints=True, task_runner=device_task_runner())
def negatives_flow(catalog: str, method: str, subjects: list[str] | None = None,
                   config: Config | None = None) -> TuneRun:
    """The CDNS negatives `method` trains on, per subject, with their generator made first."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    todo = subjects if subjects else sorted(Catalog.open(root).read("subjects").column("subject_id").to_pylist())
    with model_work(config):
        futures = on_workers(negatives_task, config, root).map(unmapped(root), todo, unmapped(method),
                                                                unmapped(config))
    return _finish(root, _collect(futures, todo, root, config), config)


@flow(name="learn-concepts", log_prints=True)
def learn_concepts_flow(catalog: str, name: str, sources: list[str], config: Config | None = None) -> TuneRun:
    """Learn the concept set `name` from `sources` (subjects or photo regions); one version."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    with model_work(config):
        futures = [on_workers(learn_task, config, root).submit(root, name, sources, config)]
    return _finish(root, _collect(futures, [name], root, config, "learned {n} concept set(s)"), config)


@flow(name="generate", log_prints=True)
def generate_flow(catalog: str, prompt: str, subjects: list[str | None], method: str | None = None, n: int = 1,
                  config: Config | None = None, references: int | None = None) -> list[dict]:
    """Sample per subject with `method`'s current artefact, or the base model when None."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    samples = [row for subject in subjects
               for row in generate_task(root, subject, method, prompt, n, config, references)]
    version_run(root, f"generate: {len(samples)} samples of {prompt!r} ({method or 'base'})", config.versioning)
    return samples
