"""The nightly `catalog-refresh`: the whole pipeline, incrementally, then one version.

ingest -> joint sets -> tune each method evaluate.methods names (in registry order, each
making what it needs first, per stale subject or once when shared) -> evaluate what is new
-> record the run -> version -> dashboard. Tuning and evaluation run on `execution.engine`
(flows/engine.py).

Every stage skips what is current (ids hash their inputs), so an unchanged catalog
refreshes in seconds and a new photo re-runs only what depends on it. Stages run with
versioning off and the refresh versions once at the end. A stage or subject that fails
is recorded and the rest go on; the run ends with a summary as Prefect artifacts and a
`runs` row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.dashboard import dashboard_flow
from flows.engine import engine, on_engine
from flows.evaluate import evaluate_flow
from flows.ingest import config_for, ingest_flow
from flows.joint import jointsets_flow
from flows.tune import tune_flow
from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion, list_versions
from subjectflow.catalog.history import RunRecord, record_run
from subjectflow.config import Config
from subjectflow.methods import registry


def configured_source(catalog: Catalog, config: Config) -> str:
    """`ingest.source` from params.yaml; a relative path is relative to that file,
    because that is where `dvc repro` runs the stage."""
    source = config.ingest.source
    if source.startswith("s3://") or Path(source).is_absolute():
        return source
    return str(catalog.params_file.parent / source)


@dataclass
class RefreshRun:
    record: RunRecord
    version: CatalogVersion | None
    dashboard: Path | None

    def summary(self) -> str:
        return self.record.summary()


def _stage(record: RunRecord, name: str, work: Callable[[], Any], account: Callable[[Any], None]) -> None:
    """Run one stage; its failure is recorded, never fatal to the stages after it."""
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - the refresh reports every failure and goes on
        get_run_logger().error("stage %s failed: %s", name, exc)
        record.failed(name, exc)
        return
    account(result)


def _account_ingest(record: RunRecord, run) -> None:
    report = run.report
    if report.ingested_new:
        record.ran.append(f"ingest: {report.ingested_new} new photos")
    if report.ingested_before:
        record.reused.append(f"ingest: {report.ingested_before} photos already in the catalog")
    for uri, reason in report.new_quarantine:
        record.failed(f"ingest {uri}", f"quarantined: {reason}")


def _account_tune(record: RunRecord, method: str, run) -> None:
    for outcome in run.outcomes:
        record.ran += [f"{outcome.subject}: {item}" for item in outcome.made]
        record.reused += [f"{outcome.subject}: {item}" for item in outcome.reused]
    for label, why in run.failures.items():
        record.failed(f"tune {method}" if label == method else f"tune {method} {label}", why)


def _account_jointsets(record: RunRecord, run) -> None:
    for subject, made in run.report.made.items():
        (record.ran if made else record.reused).append(
            f"{subject}: {made or run.report.reused[subject]} joint sets")
    for label, why in run.failures.items():
        record.failed(f"jointsets {label}", why)


def _account_evaluate(record: RunRecord, run) -> None:
    record.ran += [f"{label}: evaluated" for label in run.scored]
    record.reused += [f"{label}: evaluation" for label in run.reused]
    for label, why in run.failures.items():
        record.failed(f"evaluate {label}", why)


def _artifacts(record: RunRecord, dashboard: Path | None) -> None:
    link = f"\n\nDashboard: [{dashboard / 'index.html'}](file://{dashboard / 'index.html'})" if dashboard else ""
    create_markdown_artifact(f"## catalog-refresh: {record.status}\n\n```\n{record.summary()}\n```{link}",
                             key="catalog-refresh-summary", description="what ran, what was reused, what failed")
    rows = ([{"outcome": "made", "item": item, "detail": ""} for item in record.ran]
            + [{"outcome": "failed", "item": f["item"], "detail": f["error"]} for f in record.failures])
    create_table_artifact(rows or [{"outcome": "reused", "item": f"{len(record.reused)} items", "detail": ""}],
                          key="catalog-refresh-items", description=f"run {record.run_id}")


@flow(name="catalog-refresh", log_prints=True)
def catalog_refresh(catalog: str = "catalog", source: str | None = None, config: Config | None = None,
                    dashboard: str | None = None, subjects: list[str] | None = None) -> RefreshRun:
    """Ingest, joint sets, tune, evaluate, version, dashboard. `subjects` limits the
    per-subject tuning and the evaluation to those subjects (a shared model still trains on
    every subject it is configured to)."""
    opened = Catalog.open(Path(catalog))
    root = str(opened.root)
    config = config_for(opened, config)
    staged = config.model_copy(update={"versioning": config.versioning.model_copy(update={"enabled": False})})
    record = RunRecord(run_id=str(flow_run.get_id() or "local"), flow="catalog-refresh")

    with engine(staged) as placed:
        _stage(record, "ingest",
               lambda: on_engine(ingest_flow, placed)(source or configured_source(opened, config), root, placed),
               lambda run: _account_ingest(record, run))
        _stage(record, "jointsets", lambda: on_engine(jointsets_flow, placed)(root, None, placed),
               lambda run: _account_jointsets(record, run))
        for method in registry.targets(config, config.evaluate.methods):
            _stage(record, f"tune {method}", lambda m=method: on_engine(tune_flow, placed)(root, m, subjects, placed),
                   lambda run, m=method: _account_tune(record, m, run))
        _stage(record, "evaluate", lambda: on_engine(evaluate_flow, placed)(root, subjects, None, placed),
               lambda run: _account_evaluate(record, run))

        versions = list_versions(opened)
        latest = versions[0].number if versions else None
        # The run row goes into the version it makes; a run that made nothing is kept in the
        # table and versioned with the next change, so an unchanged catalog adds no version.
        record.catalog_version = (latest or 0) + 1 if record.ran and config.versioning.enabled else latest
        record_run(opened, record)
        version = version_run(opened.root, record.summary().splitlines()[0], config.versioning) if record.ran else None

        site = None
        try:
            site = on_engine(dashboard_flow, placed)(root, dashboard, config=placed).index.parent
        except Exception as exc:  # noqa: BLE001 - a dashboard problem must not fail a finished refresh
            get_run_logger().error("dashboard not built: %s", exc)
    _artifacts(record, site)
    get_run_logger().info(record.summary())
    return RefreshRun(record, version, site)
