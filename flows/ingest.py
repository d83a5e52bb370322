"""The ingest flow: a photo-set source in, a new catalog version out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from tqdm import tqdm

from flows.versioning import version_run
from subjectflow.catalog import Catalog, CatalogVersion
from subjectflow.config import Config, load_config
from subjectflow.ingest import IngestReport
from tasks.ingest import list_source_task, plan_ingest_task, process_photos_task, record_ingest_task


@dataclass(frozen=True)
class IngestRun:
    report: IngestReport
    version: CatalogVersion | None


def config_for(catalog: Catalog, config: Config | None) -> Config:
    """The run's config: given by the caller, else the catalog's params.yaml + env."""
    return config if config is not None else load_config(catalog.params_file)


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, catalog: str, config: Config | None = None) -> IngestRun:
    root = Catalog.open(Path(catalog)).root
    config = config_for(Catalog.open(root), config)
    listing = list_source_task(source)
    plan = plan_ingest_task(listing, root, config.ingest)

    results = []
    size = config.ingest.batch_size
    with tqdm(total=len(plan.todo), desc="ingest", unit="photo", disable=None) as progress:
        for start in range(0, len(plan.todo), size):
            batch = plan.todo[start:start + size]
            results += process_photos_task(batch, root, config.ingest)
            progress.update(len(batch))

    report = record_ingest_task(root, listing, plan, results, config.ingest)
    get_run_logger().info(report.summary())
    version = version_run(root, report.summary(), config.versioning) if report.changed else None
    return IngestRun(report, version)
