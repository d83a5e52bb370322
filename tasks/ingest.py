"""Ingest tasks: list a source, process photos in cached batches, record the run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from subjectflow.catalog import Catalog
from subjectflow.config import IngestConfig, stable_hash
from subjectflow.ingest import (
    IngestPlan, IngestReport, Listing, PhotoResult, SourceError, SourceFile, list_source, plan_ingest,
    process_photos, record_ingest, with_blobs_present,
)


def _transient(task, task_run, state) -> bool:
    """Retry listing only when it might succeed later (network), not on a wrong path."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, SourceError) or "cannot reach" in str(exc)


@task(name="list-source", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient)
def list_source_task(source: str) -> Listing:
    return list_source(source)


@task(name="plan-ingest")
def plan_ingest_task(listing: Listing, catalog_root: Path, config: IngestConfig) -> IngestPlan:
    return plan_ingest(listing, Catalog.open(catalog_root), config.settings_hash())


def batch_key(photos: list[SourceFile], catalog_root: Path, config: IngestConfig) -> str:
    """Where a batch's result is kept: keyed by content (size + mtime/ETag per file),
    settings and destination, so a retried or resumed run reuses finished batches and any
    change recomputes."""
    return "process-photos-" + stable_hash([
        str(catalog_root), config.settings_hash(), config.max_pixels, config.max_file_mb,
        [(p.uri, p.fingerprint) for p in photos],
    ])


def _batch_key(context: TaskRunContext, parameters: dict) -> str:
    return batch_key(parameters["photos"], parameters["catalog_root"], parameters["config"])


@task(name="process-photos", cache_key_fn=_batch_key, cache_expiration=timedelta(hours=12), persist_result=True)
def process_photos_task(photos: list[SourceFile], catalog_root: Path, config: IngestConfig,
                        store: str = "") -> list[PhotoResult]:
    return list(process_photos(photos, catalog_root, config, store))


@task(name="record-ingest")
def record_ingest_task(
    catalog_root: Path, listing: Listing, plan: IngestPlan, results: list[PhotoResult], config: IngestConfig,
    store: str = "",
) -> IngestReport:
    results = with_blobs_present(results, catalog_root, config, store)
    return record_ingest(Catalog.open(catalog_root), listing, plan, results, config.settings_hash())
