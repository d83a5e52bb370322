"""`subjectflow benchmark dreambench`: the DreamBench protocol on a DreamBench-layout folder.

The protocol is pinned here, not by params.yaml: its prompt lists (object or live-subject
per subject), prompts and images per subject, and one reference photo for the methods that
complete a set from them. A `--quick`
run is labelled `DreamBench-subset` in every row and table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.refresh import RefreshRun, catalog_refresh
from subjectflow.catalog import Catalog
from subjectflow.catalog.schemas import METRICS
from subjectflow.config import Config
from subjectflow.evaluation.dreambench import BUILTIN_OBJECT_PROMPTS, Protocol, method_table
from subjectflow.ingest.source import DREAMBENCH_META
from subjectflow.training.artefacts import base_model_id


@dataclass
class BenchmarkRun:
    refresh: RefreshRun
    metrics: list[dict]  # the newest score per subject, method and metric for this protocol
    table: str


def protocol_config(data: Path, config: Config, methods: list[str], protocol: Protocol) -> Config:
    """`config` with the protocol's evaluation settings and every method asked for."""
    prompts = data / DREAMBENCH_META
    if not prompts.exists():
        print(f"warning: {data} has no {DREAMBENCH_META}: every subject gets DreamBench's object prompts "
              f"(live subjects, its cats and dogs, have their own list in that file)")
    evaluate = config.evaluate.model_copy(update={
        "methods": tuple(methods), "prompt_file": str(prompts) if prompts.exists() else BUILTIN_OBJECT_PROMPTS,
        "prompts": protocol.prompts, "images_per_prompt": protocol.images_per_prompt, "protocol": protocol.name})
    joint = config.joint.model_copy(update={"max_references": protocol.references})
    return config.model_copy(update={"evaluate": evaluate, "joint": joint})


def protocol_rows(catalog: Catalog, base: str, methods: list[str], protocol: Protocol) -> list[dict]:
    """The newest score per (subject, method, metric) made under exactly this protocol."""
    newest: dict[tuple, dict] = {}
    for row in catalog.read(METRICS.name).to_pylist():
        key = (row["subject_id"], row["method"], row["metric"])
        if ((row["protocol"], row["images_per_prompt"]) == (protocol.name, protocol.images_per_prompt)
                and row["prompt_count"] == protocol.prompts and row["base_model"] == base
                and row["method"] in methods and (key not in newest or row["evaluated_at"] > newest[key]["evaluated_at"])):
            newest[key] = row
    return list(newest.values())


@flow(name="benchmark-dreambench", log_prints=True)
def dreambench_flow(data: str, catalog: str, methods: list[str], config: Config,
                    protocol: Protocol = Protocol()) -> BenchmarkRun:
    config = protocol_config(Path(data), config, methods, protocol)
    refresh = catalog_refresh(catalog, data, config)
    opened = Catalog.open(Path(catalog))
    rows = protocol_rows(opened, base_model_id(opened, config), methods, protocol)
    table = f"{protocol.describe()}\n{method_table(rows)}"
    get_run_logger().info("%s", table)
    return BenchmarkRun(refresh, rows, table)
