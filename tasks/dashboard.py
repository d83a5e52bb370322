"""Dashboard tasks: a batch of thumbnails, made on any worker."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from subjectflow.catalog import Catalog
from subjectflow.dashboard import make_thumbnails


@task(name="make-thumbnails", task_run_name="make-thumbnails-{keys[0]}")
def make_thumbnails_task(catalog_root: Path, keys: list[str]) -> dict[str, bytes | str]:
    return make_thumbnails(Catalog.open(catalog_root), keys)
