"""Evaluation tasks: plan what is stale, evaluate one (subject, method) on a device slot."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.config import Config
from subjectflow.evaluation.evaluate import Evaluation, EvaluationPlan, evaluate, plan_evaluations
from subjectflow.evaluation.metrics import generated_masker
from subjectflow.evaluation.scorers import load_scorers
from subjectflow.methods import registry
from tasks.tune import device_slot, method_context, staged_result


@task(name="plan-evaluations")
def plan_evaluations_task(catalog_root: Path, config: Config, subjects: list[str] | None,
                          methods: list[str] | None) -> EvaluationPlan:
    with method_context(catalog_root, config) as ctx:
        return plan_evaluations(ctx, subjects, methods)


@task(name="evaluate", task_run_name="evaluate-{job.subject.name}-{job.method}")
def evaluate_task(catalog_root: Path, job: Evaluation, config: Config) -> list[dict]:
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, evaluate(ctx, job, *_scoring(ctx, placed)))


@task(name="evaluate-set", task_run_name="evaluate-set-{name}")
def evaluate_set_task(catalog_root: Path, name: str, config: Config) -> list[dict]:
    """A named concept set's compositions sampled and scored."""
    with device_slot(config) as placed, method_context(catalog_root, placed) as ctx:
        return staged_result(ctx.catalog, registry.score_set(ctx, name, *_scoring(ctx, placed)))


def _scoring(ctx, config: Config) -> tuple:
    scorers = load_scorers(config.evaluate, device=ctx.parts.unet.device, models_dir=ctx.catalog.root / MODELS_DIR)
    return scorers, generated_masker(config.evaluate.masker, config.ingest.mask)
