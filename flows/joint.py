"""JeDi flows: build joint sets, train the joint model; each ends in a catalog version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.ingest import config_for
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config
from subjectflow.jointsets import JointSetsReport
from tasks.tune import device_slots, ensure_gpu_limit_task, jointsets_task, train_joint_task


@dataclass
class JointSetsRun:
    report: JointSetsReport
    version: CatalogVersion | None = None


@flow(name="jointsets", log_prints=True)
def jointsets_flow(catalog: str, subjects: list[str] | None = None, config: Config | None = None) -> JointSetsRun:
    """Build the joint-image sets that are missing and drop stale ones."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    report = jointsets_task(root, config, subjects)
    get_run_logger().info(report.summary())
    changed = any(report.made.values()) or report.removed
    return JointSetsRun(report, version_run(root, report.summary(), config.versioning) if changed else None)


@dataclass
class TrainJointRun:
    model: dict
    made: bool
    version: CatalogVersion | None = None

    def summary(self) -> str:
        what = "trained" if self.made else "reused"
        return f"JeDi joint model {self.model['model_id']} {what} ({self.model['weights']}, {self.model['steps']} steps)"


@flow(name="train-joint", log_prints=True)
def train_joint_flow(catalog: str, config: Config | None = None) -> TrainJointRun:
    """Train the JeDi joint model on the current joint sets, unless it exists already."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    ensure_gpu_limit_task(device_slots())
    result = train_joint_task(root, config)
    made = result.pop("made")
    run = TrainJointRun(result, made)
    get_run_logger().info(run.summary())
    if made:
        run.version = version_run(root, run.summary(), config.versioning)
    return run
