"""`subjectflow demo`: the whole pipeline on synthetic product photos, in its own catalog.

The demo never touches the user's repository: its catalog is a separate git + DVC
repository under `.demo/` (ignored by the project's git).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.ingest import IngestRun, ingest_flow
from subjectflow.catalog import init_catalog
from subjectflow.config import Config, load_config
from subjectflow.demo_photos import write_photo_sets

# Small photos and a small training resolution keep the demo to a couple of minutes on 2 cores.
DEMO_OVERRIDES = {"ingest": {"resolution": 256, "thumbnail_size": 96}}


@dataclass(frozen=True)
class DemoRun:
    photo_sets: Path
    catalog: Path
    ingest: IngestRun


def demo_config() -> Config:
    return load_config(overrides=DEMO_OVERRIDES)


@flow(name="demo", log_prints=True)
def demo_flow(workdir: str = ".demo") -> DemoRun:
    root = Path(workdir).resolve()
    config = demo_config()
    photo_sets = write_photo_sets(root / "photo_sets", size=384)
    catalog = init_catalog(root / "catalog", config, standalone=True)
    run = ingest_flow(str(photo_sets), str(catalog.root), config)
    return DemoRun(photo_sets, catalog.root, run)
