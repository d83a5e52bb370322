"""What the catalog holds on disk and which pipeline stage owns each part.

The DVC stages in `dvc.yaml` are rendered from `STAGES`, so a table or blob kind is
named in exactly one place; `tests/catalog/test_layout.py` checks the repository's
hand-readable `dvc.yaml` against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TABLES_DIR = "tables"
BLOBS_DIR = "blobs"
TABLE_FILE = "data.parquet"
MODELS_DIR = "models"  # base models built by the project (tiny-sd), in diffusers layout
WORK_DIR = "work"  # checkpoints and other resumable state: neither git nor DVC track it


@dataclass(frozen=True)
class Stage:
    name: str
    tables: tuple[str, ...]
    blob_kinds: tuple[str, ...]
    params: tuple[str, ...]  # params.yaml sections the stage reads
    command: str  # `{catalog}` is the catalog's path relative to the dvc.yaml
    needs: tuple[str, ...] = ()  # tables of earlier stages it reads: the DAG's edges
    dirs: tuple[str, ...] = ()  # plain (not content-addressed) directories it owns
    # Stages reading an external source (a folder or bucket DVC cannot hash cheaply)
    # always run; they are incremental, so an unchanged source costs one listing.
    always_changed: bool = False

    def outputs(self, catalog: str) -> list[str]:
        prefix = _prefix(catalog)
        return ([f"{prefix}{TABLES_DIR}/{t}" for t in self.tables]
                + [f"{prefix}{BLOBS_DIR}/{k}" for k in self.blob_kinds]
                + [f"{prefix}{d}" for d in self.dirs])


def _prefix(catalog: str) -> str:
    return "" if catalog in ("", ".") else catalog.rstrip("/") + "/"


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="ingest",
            tables=("subjects", "images", "quarantine", "source_files"),
            blob_kinds=("photos", "normalised", "masks", "thumbnails"),
            params=("ingest",),
            command="subjectflow ingest ${{ingest.source}} --catalog {catalog} --no-version",
            always_changed=True,
        ),
        Stage(
            name="jointsets",
            tables=("jointsets",),
            blob_kinds=("jointsets",),
            params=("jointsets",),
            command="subjectflow jointsets --catalog {catalog} --no-version",
            needs=("subjects", "images"),
        ),
        Stage(
            name="tune",
            # Every method's artefacts, and the negatives some train on, are made here: a
            # method's chain (adapter -> negatives -> adapter) runs in one stage. Which
            # methods run is evaluate.methods, hence that section among the params.
            # Concept sets are learned on request (`subjectflow concepts learn`), not by this
            # stage's command, but live with the other trained artefacts.
            tables=("negatives", "adapters", "models", "class_images", "clusters", "concept_masks", "train_log"),
            blob_kinds=("negatives", "adapters", "models", "class_images", "clusters", "concept_masks"),
            dirs=(MODELS_DIR,),
            params=("model", "train", "sft", "sfo", "negatives", "joint", "oneactor", "detex", "concepts",
                    "evaluate"),
            command="subjectflow tune --all --catalog {catalog} --no-version",
            needs=("subjects", "images", "jointsets"),
        ),
        Stage(
            name="evaluate",
            # Samples live here: evaluation generates them, and ad-hoc `subjectflow generate`
            # adds to the same table. `runs` rides along: the run history is reporting.
            tables=("samples", "metrics", "prompt_metrics", "concept_scores", "runs"),
            blob_kinds=("samples",),
            params=("model", "generate", "evaluate"),
            command="subjectflow evaluate --catalog {catalog} --no-version",
            needs=("adapters", "models"),
        ),
    )
}

BLOB_KINDS: tuple[str, ...] = tuple(k for s in STAGES.values() for k in s.blob_kinds)
STAGE_DIRS: tuple[str, ...] = tuple(d for s in STAGES.values() for d in s.dirs)



def owning_stage(table: str) -> Stage:
    for stage in STAGES.values():
        if table in stage.tables:
            return stage
    raise KeyError(f"no stage owns table {table!r}")


def render_dvc_stages(catalog: str, code_deps: tuple[str, ...] = ()) -> dict[str, Any]:
    """The `stages:` mapping of a dvc.yaml for a catalog at `catalog` (relative path).

    Outputs are `persist`ed because every stage updates the catalog incrementally:
    DVC must not delete yesterday's tables before today's run.
    """
    stages: dict[str, Any] = {}
    for stage in STAGES.values():
        entry: dict[str, Any] = {"cmd": stage.command.format(catalog=catalog or ".")}
        deps = list(code_deps) + [f"{_prefix(catalog)}{TABLES_DIR}/{t}" for t in stage.needs]
        if deps:
            entry["deps"] = deps
        entry["params"] = list(stage.params)
        entry["outs"] = [{path: {"persist": True}} for path in stage.outputs(catalog)]
        if stage.always_changed:
            entry["always_changed"] = True
        stages[stage.name] = entry
    return stages
