"""The step every catalog-changing flow ends with: record a version, push it."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from subjectflow.catalog import CatalogVersion
from subjectflow.config import VersioningConfig
from tasks.catalog import push_catalog_task, version_catalog_task


def version_run(catalog_root: Path, summary: str, config: VersioningConfig) -> CatalogVersion | None:
    if not config.enabled:
        return None
    logger = get_run_logger()
    version = version_catalog_task(catalog_root, summary)
    if version is None:
        logger.info("catalog unchanged since its last version; nothing to record")
        return None
    logger.info("recorded catalog v%d (%s)", version.number, version.commit[:10])
    if config.push and push_catalog_task(catalog_root):
        logger.info("pushed catalog v%d to the DVC remote", version.number)
    return version
