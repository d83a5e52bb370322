"""`subjectflow demo`: the nightly refresh on synthetic product photos, in its own catalog.

The demo never touches the user's repository: its catalog is a separate git + DVC
repository under `.demo/` (ignored by the project's git), with the dashboard beside it.
It runs the whole `catalog-refresh` (ingest, joint sets, every evaluated method, evaluation,
version, dashboard), refreshes again to show that nothing changed costs seconds, then
learns one concept set on the drawn photos.
On the embedded tiny-sd model its images show that the pipeline works, not what a real
model makes, and its scores come from random-test scorers (flagged as such).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.refresh import RefreshRun, catalog_refresh
from flows.tune import TuneRun, learn_concepts_flow
from subjectflow.catalog import init_catalog
from subjectflow.config import Config, load_config
from subjectflow.dashboard import build_dashboard
from subjectflow.demo_photos import write_photo_sets

# Small photos, 64 px training and short runs keep the whole demo to a few minutes on 2
# cores; the settings are data beside this file so the flow itself names no method.
DEMO_PARAMS = Path(__file__).with_name("demo.yaml")
# A concept set over drawn photos, whose exact masks the demo knows: every EM iteration's
# masks are scored against them as well as against ingest's (the report the CLI prints).
DEMO_SET = ("scene", ["subject:red_mug", "image:blue_bottle/00.jpg:background=studio"])


@dataclass(frozen=True)
class DemoRun:
    photo_sets: Path
    catalog: Path
    refresh: RefreshRun
    unchanged: RefreshRun
    unchanged_seconds: float
    concept_set: TuneRun


def demo_config() -> Config:
    return load_config(DEMO_PARAMS)


@flow(name="demo", log_prints=True)
def demo_flow(workdir: str = ".demo") -> DemoRun:
    root = Path(workdir).resolve()
    config = demo_config()
    photo_sets = write_photo_sets(root / "photo_sets", size=384)
    catalog = init_catalog(root / "catalog", config, standalone=True)
    dashboard = str(root / "dashboard")
    refresh = catalog_refresh(str(catalog.root), str(photo_sets), config, dashboard)
    started = time.perf_counter()
    unchanged = catalog_refresh(str(catalog.root), str(photo_sets), config, dashboard)
    unchanged_seconds = time.perf_counter() - started
    concept_set = learn_concepts_flow(str(catalog.root), *DEMO_SET, config)
    build_dashboard(catalog, Path(dashboard))  # now with the set's masks
    return DemoRun(photo_sets, catalog.root, refresh, unchanged, unchanged_seconds, concept_set)
