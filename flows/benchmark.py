"""`subjectflow benchmark dreambench`: the DreamBench protocol on a DreamBench-layout folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.refresh import RefreshRun, catalog_refresh
from subjectflow.catalog import Catalog
from subjectflow.catalog.schemas import METRICS
from subjectflow.config import Config
from subjectflow.evaluation.dreambench import method_table
from subjectflow.evaluation.evaluate import prompt_set
from subjectflow.ingest.source import DREAMBENCH_META


@dataclass
class BenchmarkRun:
    refresh: RefreshRun
    metrics: list[dict]  # the newest score per subject, method and metric for this protocol
    table: str


def protocol_config(data: Path, config: Config, methods: list[str]) -> Config:
    """DreamBench's own prompts when the folder has them; every method asked for."""
    prompts = data / DREAMBENCH_META
    evaluate = config.evaluate.model_copy(update={"methods": tuple(methods),
                                                  "prompt_file": str(prompts) if prompts.exists() else ""})
    return config.model_copy(update={"evaluate": evaluate})


@flow(name="benchmark-dreambench", log_prints=True)
def dreambench_flow(data: str, catalog: str, methods: list[str], config: Config) -> BenchmarkRun:
    config = protocol_config(Path(data), config, methods)
    refresh = catalog_refresh(catalog, data, config)
    name = prompt_set(config).name
    newest: dict[tuple, dict] = {}
    for row in Catalog.open(Path(catalog)).read(METRICS.name).to_pylist():
        key = (row["subject_id"], row["method"], row["metric"])
        if row["prompt_set"] == name and row["method"] in methods and (
                key not in newest or row["evaluated_at"] > newest[key]["evaluated_at"]):
            newest[key] = row
    table = method_table(list(newest.values()))
    get_run_logger().info("DreamBench (%s):\n%s", name, table)
    return BenchmarkRun(refresh, list(newest.values()), table)
