"""Versioning tasks: record a catalog version, push it to the DVC remote."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from subjectflow.catalog import Catalog, CatalogVersion, push_catalog, version_catalog


@task(name="version-catalog")
def version_catalog_task(catalog_root: Path, summary: str) -> CatalogVersion | None:
    return version_catalog(Catalog.open(catalog_root), summary)


@task(name="push-catalog", retries=3, retry_delay_seconds=[5, 30, 120])
def push_catalog_task(catalog_root: Path) -> bool:
    return push_catalog(Catalog.open(catalog_root))
