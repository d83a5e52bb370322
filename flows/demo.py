"""`subjectflow demo`: the whole pipeline on synthetic product photos, in its own catalog.

The demo never touches the user's repository: its catalog is a separate git + DVC
repository under `.demo/` (ignored by the project's git). It runs on the embedded
tiny-sd model, so its samples show that the pipeline works, not what a real model makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.ingest import IngestRun, ingest_flow
from flows.tune import TuneRun, generate_flow, tune_flow
from subjectflow.catalog import init_catalog
from subjectflow.config import Config, load_config
from subjectflow.demo_photos import write_photo_sets

# Small photos, 64 px training and short runs keep the whole demo to a few minutes on 2 cores.
DEMO_OVERRIDES = {
    "ingest": {"resolution": 128, "thumbnail_size": 96},
    "train": {"resolution": 64, "steps": 60, "checkpoint_every": 30, "learning_rate": 1e-3},
    "sfo": {"steps": 30, "learning_rate": 1e-3},
    "negatives": {"steps": 10},
    "generate": {"resolution": 64, "steps": 10},
}
DEMO_PROMPT = "a photo of {subject} on the beach"


@dataclass(frozen=True)
class DemoRun:
    photo_sets: Path
    catalog: Path
    ingest: IngestRun
    tune: TuneRun
    samples: list[dict]


def demo_config() -> Config:
    return load_config(overrides=DEMO_OVERRIDES)


@flow(name="demo", log_prints=True)
def demo_flow(workdir: str = ".demo") -> DemoRun:
    root = Path(workdir).resolve()
    config = demo_config()
    photo_sets = write_photo_sets(root / "photo_sets", size=384)
    catalog = init_catalog(root / "catalog", config, standalone=True)
    ingested = ingest_flow(str(photo_sets), str(catalog.root), config)
    tuned = tune_flow(str(catalog.root), "sfo", None, config)
    subjects = sorted(catalog.read("subjects").column("subject_id").to_pylist())
    samples = [row for method in ("sft", "sfo")
               for row in generate_flow(str(catalog.root), DEMO_PROMPT, subjects, method, 2, None, config)]
    return DemoRun(photo_sets, catalog.root, ingested, tuned, samples)
