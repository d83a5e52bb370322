"""Joint-set tasks: make a batch of subjects' sets (on any worker), record them (the flow)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import get_run_logger, task
from prefect.runtime import task_run

from subjectflow.catalog import Catalog
from subjectflow.config import Config
from subjectflow.jointsets import JointSetsBatch, JointSetsReport, make_jointsets, record_jointsets
from subjectflow.training.artefacts import at_model_resolution, open_model
from tasks.tune import device_slot, staged_result, worker_catalog


def _batch_name() -> str:
    subjects = task_run.parameters["subjects"]
    if not subjects:
        return "make-jointsets-all-subjects"
    return f"make-jointsets-{subjects[0]}" + (f"-and-{len(subjects) - 1}-more" if len(subjects) > 1 else "")


@task(name="make-jointsets", task_run_name=_batch_name)
def make_jointsets_task(catalog_root: Path, config: Config, subjects: list[str] | None = None) -> JointSetsBatch:
    """The subjects' missing sets as shards; synthetic sets draw on the base model, so
    then the task holds a device like every model task."""
    synthetic = config.jointsets.synthetic.enabled
    with device_slot(config) if synthetic else contextlib.nullcontext(config) as placed:
        catalog = worker_catalog(catalog_root, placed)
        placed = at_model_resolution(catalog, placed)
        extra = None
        if synthetic:
            from subjectflow.jointsets.synthetic import synthetic_planner

            parts, base = open_model(catalog, placed)
            extra = synthetic_planner(parts, base, placed)
        batch = make_jointsets(catalog, placed.jointsets, subjects, extra, say=get_run_logger().info)
        return staged_result(catalog, batch)


@task(name="record-jointsets")
def record_jointsets_task(catalog_root: Path, batches: list[JointSetsBatch]) -> JointSetsReport:
    return record_jointsets(Catalog.open(catalog_root), batches)
