"""The joint-sets flow: build the joint-image training sets, then a catalog version.

On an engine, batches of `jointsets.subjects_per_task` subjects are made on the workers
(CPU tasks, or model tasks when synthetic sets draw on the base model) and the flow
records them all in one write; locally one task makes them in this process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.utilities.annotations import quote

from flows.engine import in_batches, model_work, on_workers
from flows.ingest import config_for
from flows.tune import wait_all
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config
from subjectflow.jointsets import JointSetsBatch, JointSetsReport
from subjectflow.training.subjects import load_subjects
from tasks.jointsets import make_jointsets_task, record_jointsets_task


@dataclass
class JointSetsRun:
    report: JointSetsReport
    version: CatalogVersion | None = None
    failures: dict[str, str] = field(default_factory=dict)  # a batch of subjects -> why

    def summary(self) -> str:
        return "\n".join([self.report.summary()] + [f"  FAILED {label}: {why}" for label, why in self.failures.items()])


def _make_on_engine(root: Path, config: Config, subjects: list[str] | None) -> tuple[list[JointSetsBatch], dict]:
    names = [s.name for s in load_subjects(Catalog.open(root), subjects)]
    batches = in_batches(names, config.jointsets.subjects_per_task)
    needs_model = config.jointsets.synthetic.enabled
    with model_work(config) if needs_model else contextlib.nullcontext():
        futures = on_workers(make_jointsets_task, config, root).map(unmapped(root), unmapped(config), batches)
    made, failures = wait_all(futures, [f"subjects {b[0]}..{b[-1]}" for b in batches], root, config)
    return list(made.values()), failures


@flow(name="jointsets", log_prints=True)
def jointsets_flow(catalog: str, subjects: list[str] | None = None, config: Config | None = None) -> JointSetsRun:
    """Build the joint-image sets that are missing and drop stale ones. A batch that fails
    is reported; the others are recorded."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    if config.execution.engine == "local":
        batches, failures = [make_jointsets_task(root, config, subjects)], {}
    else:
        batches, failures = _make_on_engine(root, config, subjects)
    run = JointSetsRun(record_jointsets_task(root, quote(batches)), failures=failures)  # quote: see flows/ingest.py
    get_run_logger().info(run.summary())
    if any(run.report.made.values()) or run.report.removed:
        run.version = version_run(root, run.report.summary(), config.versioning)
    return run
