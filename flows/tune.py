"""Per-subject tuning flows: tune, negatives and generate, each ending in a catalog version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.ingest import config_for
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config
from subjectflow.tuning.runs import TuneOutcome
from tasks.tune import (
    device_slots, device_task_runner, ensure_gpu_limit_task, generate_task, jedi_negatives_task, needs_tuning_task,
    negatives_task, sfo_joint_task, tune_subject_task,
)


@dataclass
class TuneRun:
    outcomes: list[TuneOutcome] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # subject -> why
    version: CatalogVersion | None = None

    def summary(self) -> str:
        lines = [f"tuned {len(self.outcomes)} subject(s), {len(self.failures)} failed"]
        lines += [f"  {o.summary()}" for o in self.outcomes]
        lines += [f"  FAILED {subject}: {why}" for subject, why in self.failures.items()]
        return "\n".join(lines)


def wait_all(futures, labels: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait for every future: (results, failures) by label. One failure is reported,
    never fatal to the others."""
    results, failures = {}, {}
    for label, future in zip(labels, futures):
        state = future.wait() or future.state
        if state.is_completed():
            results[label] = future.result()
        else:
            exc = state.result(raise_on_failure=False)
            failures[label] = f"{type(exc).__name__}: {exc}"
    return results, failures


def _collect(futures, subjects: list[str]) -> TuneRun:
    results, failures = wait_all(futures, subjects)
    return TuneRun(list(results.values()), failures)


def _finish(root: Path, run: TuneRun, config: Config) -> TuneRun:
    get_run_logger().info(run.summary())
    if any(o.made for o in run.outcomes):
        run.version = version_run(root, run.summary(), config.versioning)
    return run


@flow(name="tune", log_prints=True, task_runner=device_task_runner())
def tune_flow(catalog: str, method: str = "sfo", subjects: list[str] | None = None, config: Config | None = None,
              target: str = "subject") -> TuneRun:
    """Tune the given subjects, or every subject whose adapter is missing or stale.

    `target="joint"` (method sfo only) trains the zero-shot SFO LoRA on the JeDi joint
    model instead, from the CDNS pairs of every subject.
    """
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    ensure_gpu_limit_task(device_slots())
    if target == "joint":
        if method != "sfo":
            raise ValueError(f"--target joint trains SFO on the joint model; method {method!r} has no joint form")
        return _finish(root, _collect([sfo_joint_task.submit(root, config)], ["joint model"]), config)
    todo = subjects if subjects else needs_tuning_task(root, method, config)
    futures = tune_subject_task.map(unmapped(root), todo, unmapped(method), unmapped(config))
    return _finish(root, _collect(futures, todo), config)


@flow(name="negatives", log_prints=True, task_runner=device_task_runner())
def negatives_flow(catalog: str, subjects: list[str] | None = None, config: Config | None = None,
                   generator: str = "sft") -> TuneRun:
    """CDNS negatives per subject, sampled by its SFT adapter (img2img) or by the JeDi model."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    ensure_gpu_limit_task(device_slots())
    todo = subjects if subjects else sorted(Catalog.open(root).read("subjects").column("subject_id").to_pylist())
    per_subject = jedi_negatives_task if generator == "jedi" else negatives_task
    futures = per_subject.map(unmapped(root), todo, unmapped(config))
    return _finish(root, _collect(futures, todo), config)


@flow(name="generate", log_prints=True)
def generate_flow(catalog: str, prompt: str, subjects: list[str | None], method: str = "sfo", n: int = 1,
                  adapter_id: str | None = None, config: Config | None = None,
                  references: int | None = None) -> list[dict]:
    """Sample per subject with its adapter (sft, sfo), the base model, or by JeDi set
    completion from `references` of its photos (jedi, jedi-sfo)."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    ensure_gpu_limit_task(device_slots())
    samples = [row for subject in subjects
               for row in generate_task(root, subject, method, prompt, n, config, adapter_id, references)]
    version_run(root, f"generate: {len(samples)} samples of {prompt!r} ({method})", config.versioning)
    return samples
