"""The joint-sets flow: build the joint-image training sets, then a catalog version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.ingest import config_for
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config
from subjectflow.jointsets import JointSetsReport
from tasks.tune import jointsets_task


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
