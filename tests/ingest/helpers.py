from pathlib import Path

from subjectflow.catalog import Catalog
from subjectflow.config import IngestConfig
from subjectflow.ingest import IngestReport, list_source, plan_ingest, process_photos, record_ingest


def ingest(source: Path | str, catalog: Catalog, config: IngestConfig | None = None) -> IngestReport:
    """The ingest flow's steps without Prefect: list, plan, process, record."""
    config = config or IngestConfig(workers=1, resolution=64, thumbnail_size=32, mask={"size": 32})
    listing = list_source(str(source))
    plan = plan_ingest(listing, catalog, config.settings_hash())
    results = list(process_photos(plan.todo, catalog.root, config))
    return record_ingest(catalog, listing, plan, results, config.settings_hash())
