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


@dataclass(frozen=True)
class Stage:
    name: str
    tables: tuple[str, ...]
    blob_kinds: tuple[str, ...]
    params: tuple[str, ...]  # params.yaml sections the stage reads
    command: str  # `{catalog}` is the catalog's path relative to the dvc.yaml
    # Stages reading an external source (a folder or bucket DVC cannot hash cheaply)
    # always run; they are incremental, so an unchanged source costs one listing.
    always_changed: bool = False

    def outputs(self, catalog: str) -> list[str]:
        prefix = "" if catalog in ("", ".") else catalog.rstrip("/") + "/"
        return [f"{prefix}{TABLES_DIR}/{t}" for t in self.tables] + [
            f"{prefix}{BLOBS_DIR}/{k}" for k in self.blob_kinds
        ]


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
    )
}

BLOB_KINDS: tuple[str, ...] = tuple(k for s in STAGES.values() for k in s.blob_kinds)


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
        if code_deps:
            entry["deps"] = list(code_deps)
        entry["params"] = list(stage.params)
        entry["outs"] = [{path: {"persist": True}} for path in stage.outputs(catalog)]
        if stage.always_changed:
            entry["always_changed"] = True
        stages[stage.name] = entry
    return stages
