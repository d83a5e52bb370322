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

from flows.ingest import ingest_flow
from flows.refresh import RefreshRun, catalog_refresh
from subjectflow.catalog import Catalog
from subjectflow.catalog.schemas import METRICS, SUBJECTS
from subjectflow.config import Config, ConfigError
from subjectflow.evaluation.dreambench import BUILTIN_OBJECT_PROMPTS, Protocol, method_table
from subjectflow.ingest.source import DREAMBENCH_META
from subjectflow.training.artefacts import base_model_id


@dataclass
class BenchmarkRun:
    refresh: RefreshRun
    metrics: list[dict]  # the newest score per subject, method and metric for this protocol
    table: str


def benchmark_subjects(data: Path) -> list[str]:
    """The subjects of a DreamBench-layout folder: its sub-folders."""
    return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))


def protocol_config(data: Path, config: Config, methods: list[str], protocol: Protocol,
                    held_out: bool = False) -> Config:
    """`config` with the protocol's evaluation settings and every method asked for; with
    `held_out`, the benchmark's subjects are held out of the models shared across subjects."""
    prompts = data / DREAMBENCH_META
    if not prompts.exists():
        print(f"warning: {data} has no {DREAMBENCH_META}: every subject gets DreamBench's object prompts "
              f"(live subjects, its cats and dogs, have their own list in that file)")
    evaluate = config.evaluate.model_copy(update={
        "methods": tuple(methods), "prompt_file": str(prompts) if prompts.exists() else BUILTIN_OBJECT_PROMPTS,
        "prompts": protocol.prompts, "images_per_prompt": protocol.images_per_prompt, "protocol": protocol.name})
    joint = config.joint.model_copy(update={"max_references": protocol.references,
                                            "holdout": tuple(benchmark_subjects(data)) if held_out else ()})
    return config.model_copy(update={"evaluate": evaluate, "joint": joint})


def protocol_rows(catalog: Catalog, base: str, methods: list[str], protocol: Protocol,
                  subjects: list[str]) -> list[dict]:
    """The newest score per (subject, method, metric) of the benchmark's subjects made under
    exactly this protocol."""
    ids = {r["subject_id"] for r in catalog.read(SUBJECTS.name).to_pylist() if r["name"] in subjects}
    newest: dict[tuple, dict] = {}
    for row in catalog.read(METRICS.name).to_pylist():
        key = (row["subject_id"], row["method"], row["metric"])
        if row["subject_id"] in ids and ((row["protocol"], row["images_per_prompt"]) == (protocol.name, protocol.images_per_prompt)
                and row["prompt_count"] == protocol.prompts and row["base_model"] == base
                and row["method"] in methods and (key not in newest or row["evaluated_at"] > newest[key]["evaluated_at"])):
            newest[key] = row
    return list(newest.values())


@flow(name="benchmark-dreambench", log_prints=True)
def dreambench_flow(data: str, catalog: str, methods: list[str], config: Config,
                    protocol: Protocol = Protocol(), train_data: str | None = None) -> BenchmarkRun:
    """The protocol on `data`. With `train_data`, a photo folder of other subjects, models
    shared across subjects train on those only, so their scores here are zero-shot; without
    it they train on the benchmark's own subjects and every such score says in-catalog."""
    config = protocol_config(Path(data), config, methods, protocol, held_out=train_data is not None)
    subjects = benchmark_subjects(Path(data))
    if train_data is not None:
        clash = sorted(set(subjects) & set(benchmark_subjects(Path(train_data))))
        if clash:
            raise ConfigError(f"--train-data {train_data} holds benchmark subjects {clash}; "
                             f"train on other subjects, or the scores are not zero-shot")
        ingest_flow(train_data, catalog, config)
    refresh = catalog_refresh(catalog, data, config, subjects=subjects)
    opened = Catalog.open(Path(catalog))
    rows = protocol_rows(opened, base_model_id(opened, config), methods, protocol, subjects)
    table = f"{protocol.describe()}\n{method_table(rows)}"
    get_run_logger().info("%s", table)
    return BenchmarkRun(refresh, rows, table)
