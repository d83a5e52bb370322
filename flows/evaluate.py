"""The evaluate flow: score every stale (subject, method), one task each, then version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, unmapped

from flows.engine import limit_devices, model_work, on_workers
from flows.ingest import config_for
from flows.tune import wait_all
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config
from subjectflow.training.subjects import IN_CATALOG
from tasks.evaluate import evaluate_set_task, evaluate_task, plan_evaluations_task
from tasks.tune import device_task_runner


@dataclass
class EvaluateRun:
    scored: dict[str, list[dict]] = field(default_factory=dict)  # "subject/method" -> metrics rows
    reused: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    version: CatalogVersion | None = None

    def summary(self) -> str:
        lines = [f"evaluated {len(self.scored)}, already current {len(self.reused)}, "
                 f"no model yet {len(self.unavailable)}, failed {len(self.failures)}"]
        for label, rows in self.scored.items():
            flagged = {r["scorer_kind"] for r in rows} - {"pretrained"}
            flag = f"  [{', '.join(sorted(flagged))} scorer]" if flagged else ""
            # A shared model scored on a subject it trained on: never to be read as zero-shot.
            seen = "  [in-catalog: the shared model trained on this subject]" if any(
                r.get("split") == IN_CATALOG for r in rows) else ""
            lines.append(f"  {label}: " + ", ".join(f"{r['metric']} {r['value']:.3f}" for r in rows) + flag + seen)
        lines += [f"  FAILED {label}: {why}" for label, why in self.failures.items()]
        return "\n".join(lines)


@flow(name="evaluate", log_prints=True, task_runner=device_task_runner())
def evaluate_flow(catalog: str, subjects: list[str] | None = None, methods: list[str] | None = None,
                  config: Config | None = None) -> EvaluateRun:
    """Evaluate each subject's current model per method, unless already evaluated as configured."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    plan = plan_evaluations_task(root, config, subjects, methods)
    run = EvaluateRun(reused=plan.done, unavailable=plan.unavailable)
    if plan.todo:
        limit_devices(config)
        with model_work(config):
            futures = on_workers(evaluate_task, config, root).map(unmapped(root), plan.todo, unmapped(config))
        labels = [f"{job.subject.name}/{job.method}" for job in plan.todo]
        run.scored, run.failures = wait_all(futures, labels, root, config)
    get_run_logger().info(run.summary())
    if run.scored:
        run.version = version_run(root, f"evaluate: {len(run.scored)} evaluations", config.versioning)
    return run


@flow(name="evaluate-set", log_prints=True)
def evaluate_set_flow(catalog: str, name: str, config: Config | None = None) -> list[dict]:
    """Sample and score a named concept set's compositions, then version."""
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    limit_devices(config)
    rows = evaluate_set_task(root, name, config)
    version_run(root, f"evaluate set {name}: {len(rows)} scores", config.versioning)
    return rows
