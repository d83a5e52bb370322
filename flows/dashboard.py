"""The dashboard flow: the catalog's static site, its new thumbnails made on the engine.

Locally the build makes what it shows as it writes the pages. On an engine the
thumbnails the site lacks are made first, `execution.thumbnails_per_task` to a CPU task
spread over the workers, and the build links them in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, unmapped

from flows.engine import in_batches
from flows.ingest import config_for
from subjectflow.catalog import Catalog
from subjectflow.config import Config
from subjectflow.dashboard import DashboardSite, build_dashboard, save_thumbnails, thumbnails_to_make
from tasks.dashboard import make_thumbnails_task


def default_dashboard_dir(catalog: Catalog) -> Path:
    """Beside the catalog, not in it: the site is derived, so neither git nor DVC keeps it."""
    return catalog.root.parent / "dashboard"


@flow(name="dashboard", log_prints=True)
def dashboard_flow(catalog: str, out: str | None = None, page_size: int = 50,
                   config: Config | None = None) -> DashboardSite:
    opened = Catalog.open(Path(catalog))
    config = config_for(opened, config)
    out_dir = Path(out).resolve() if out else default_dashboard_dir(opened)
    if config.execution.engine == "local":
        return build_dashboard(opened, out_dir, page_size)
    keys = thumbnails_to_make(opened, out_dir)
    futures = make_thumbnails_task.map(unmapped(opened.root), in_batches(keys, config.execution.thumbnails_per_task))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-thumbnails-", dir=out_dir.parent) as made:
        for future in futures:
            try:
                save_thumbnails(Path(made), future.result())
            except Exception as exc:  # noqa: BLE001 - the build makes that batch's thumbnails itself
                get_run_logger().warning("a batch of thumbnails failed on the engine (%s); making it here", exc)
        return build_dashboard(opened, out_dir, page_size, Path(made))
