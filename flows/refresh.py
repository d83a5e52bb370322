"""The nightly `catalog-refresh`: bring the whole catalog up to date with its source.

Today the pipeline is ingest; later stages (negatives, tuning, evaluation) are added
here as subflows, each incremental, so an unchanged catalog refreshes in seconds.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.ingest import IngestRun, config_for, ingest_flow
from subjectflow.catalog import Catalog
from subjectflow.config import Config


def configured_source(catalog: Catalog, config: Config) -> str:
    """`ingest.source` from params.yaml; a relative path is relative to that file,
    because that is where `dvc repro` runs the stage."""
    source = config.ingest.source
    if source.startswith("s3://") or Path(source).is_absolute():
        return source
    return str(catalog.params_file.parent / source)


@flow(name="catalog-refresh", log_prints=True)
def catalog_refresh(catalog: str = "catalog", source: str | None = None, config: Config | None = None) -> IngestRun:
    opened = Catalog.open(Path(catalog))
    config = config_for(opened, config)
    return ingest_flow(source or configured_source(opened, config), catalog, config)
