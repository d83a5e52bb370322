"""Evaluation tasks: plan what is stale, evaluate one (subject, method) on a device slot."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from subjectflow.catalog import Catalog
from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.config import Config
from subjectflow.evaluation.evaluate import Evaluation, EvaluationPlan, evaluate, plan_evaluations
from subjectflow.evaluation.metrics import ingest_masker
from subjectflow.evaluation.scorers import load_scorers
from subjectflow.tuning.runs import base_model_id, open_model
from tasks.tune import device_slot


@task(name="plan-evaluations")
def plan_evaluations_task(catalog_root: Path, config: Config, subjects: list[str] | None,
                          methods: list[str] | None) -> EvaluationPlan:
    catalog = Catalog.open(catalog_root)
    return plan_evaluations(catalog, config, base_model_id(catalog, config), subjects, methods)


@task(name="evaluate", task_run_name="evaluate-{job.subject.name}-{job.method}")
def evaluate_task(catalog_root: Path, job: Evaluation, config: Config) -> list[dict]:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        scorers = load_scorers(config.evaluate, device=parts.unet.device, models_dir=catalog.root / MODELS_DIR)
        return evaluate(catalog, config, parts, base, job, scorers, ingest_masker(config.ingest.mask),
                        say=get_run_logger().info)
