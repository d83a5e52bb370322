"""The run history: one `runs` row per pipeline run, for the summary and the dashboard."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa

from .schemas import RUNS
from .store import Catalog, utcnow


@dataclass
class RunRecord:
    run_id: str
    flow: str
    started_at: datetime = field(default_factory=utcnow)
    ran: list[str] = field(default_factory=list)  # what was made: "sft adapter ab12", "3 negatives"
    reused: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # {"item": ..., "error": ...}
    catalog_version: int | None = None

    def failed(self, item: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failures.append({"item": item, "error": text})

    @property
    def status(self) -> str:
        if not self.failures:
            return "completed"
        return "partial" if self.ran or self.reused else "failed"

    def summary(self) -> str:
        lines = [f"{self.flow} {self.status}: {len(self.ran)} made, {len(self.reused)} reused, "
                 f"{len(self.failures)} failed"]
        lines += [f"  made {item}" for item in self.ran]
        lines += [f"  FAILED {f['item']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def record_run(catalog: Catalog, run: RunRecord) -> dict:
    row = {"run_id": run.run_id, "flow": run.flow, "started_at": run.started_at, "finished_at": utcnow(),
           "status": run.status, "ran": run.ran, "reused": run.reused, "failures": json.dumps(run.failures),
           "catalog_version": run.catalog_version, "summary": run.summary()}
    with catalog.writer():
        catalog.upsert(RUNS.name, pa.Table.from_pylist([row], schema=RUNS.schema))
    return row
