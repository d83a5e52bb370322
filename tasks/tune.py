"""Tuning tasks: plan which subjects need adapters, tune one subject, make negatives, sample.

Work that holds a model takes a device slot (one per GPU, one on a CPU-only machine),
so mapped subjects queue for devices instead of fighting over memory.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

import torch
from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ThreadPoolTaskRunner

from subjectflow.catalog import Catalog
from subjectflow.config import Config
from subjectflow.jointsets import JointSetsReport, build_jointsets
from subjectflow.tuning.generate import current_adapter, generate_jedi_samples, generate_samples
from subjectflow.tuning.joint import (
    JEDI_METHODS, current_joint_model, current_sets, current_sfo_joint_model, make_jedi_negatives, train_joint, train_sfo_joint,
)
from subjectflow.tuning.runs import (
    TuneOutcome, TuningError, base_model_id, load_subject, needs_tuning, negatives_for_subject, open_model,
    tune_subject,
)

GPU_LIMIT = "subjectflow-gpu"
SLOT_TIMEOUT_S = 6 * 3600  # longer than any one subject's tuning; then fail, never hang


def device_slots() -> int:
    return torch.cuda.device_count() or 1


_local_slots = threading.BoundedSemaphore(device_slots())


def device_task_runner() -> ThreadPoolTaskRunner:
    """A worker thread per device for flows that map model tasks over subjects.

    Prefect's default pool starts a thread per submitted task. The tasks queue for a
    device slot anyway, so 2,000 mapped subjects meant 2,000 live threads, each keeping
    its own native torch and malloc state: a 1,000-subject refresh grew past 23 GB.
    """
    return ThreadPoolTaskRunner(max_workers=device_slots())


def _uses_server() -> bool:
    """True when runs report to a Prefect server (deployments, `prefect server start`).

    Without one, the CLI's temporary server keeps its database but runs no lease-expiry
    service, so a slot held by a killed run would never come back; a single process
    needs no server-side limit anyway.
    """
    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def device_slot() -> Iterator[None]:
    if not _uses_server():
        with _local_slots:
            yield
        return
    try:
        with concurrency(GPU_LIMIT, occupy=1, strict=True, timeout_seconds=SLOT_TIMEOUT_S):
            yield
    except TimeoutError:
        raise TimeoutError(
            f"waited {SLOT_TIMEOUT_S}s for a '{GPU_LIMIT}' slot; if no other run is using the devices, "
            f"a crashed run still holds one: `prefect gcl update {GPU_LIMIT} --active-slots 0`") from None


@task(name="ensure-gpu-limit", retries=2, retry_delay_seconds=2)
def ensure_gpu_limit_task(slots: int) -> None:
    if _uses_server():
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


@task(name="plan-tuning")
def needs_tuning_task(catalog_root: Path, method: str, config: Config) -> list[str]:
    catalog = Catalog.open(catalog_root)
    return needs_tuning(catalog, method, config, base_model_id(catalog, config))


@task(name="tune-subject", task_run_name="tune-{subject}-{method}")
def tune_subject_task(catalog_root: Path, subject: str, method: str, config: Config) -> TuneOutcome:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        return tune_subject(catalog, subject, method, config, parts, base, say=get_run_logger().info)


@task(name="make-negatives", task_run_name="negatives-{subject}")
def negatives_task(catalog_root: Path, subject: str, config: Config) -> TuneOutcome:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        return negatives_for_subject(catalog, subject, config, parts, base, say=get_run_logger().info)


@task(name="build-jointsets")
def jointsets_task(catalog_root: Path, config: Config, subjects: list[str] | None = None) -> JointSetsReport:
    catalog = Catalog.open(catalog_root)
    extra = None
    if config.jointsets.synthetic.enabled:
        from subjectflow.jointsets.synthetic import synthetic_planner

        parts, base = open_model(catalog, config)
        extra = synthetic_planner(parts, base, config)
    return build_jointsets(catalog, config.jointsets, subjects, extra, say=get_run_logger().info)


@task(name="train-joint")
def train_joint_task(catalog_root: Path, config: Config) -> dict:
    """The current joint model, trained (or resumed) when missing."""
    catalog = Catalog.open(catalog_root)
    try:  # found by id alone: an unchanged refresh never loads the model
        return {**current_joint_model(catalog, config, base_model_id(catalog, config)), "made": False}
    except TuningError:
        pass
    with device_slot():
        parts, base = open_model(catalog, config)
        get_run_logger().info("training the JeDi joint model on %d joint sets", len(current_sets(catalog, config)))
        return {**train_joint(catalog, config, parts, base), "made": True}


@task(name="jedi-negatives", task_run_name="jedi-negatives-{subject}")
def jedi_negatives_task(catalog_root: Path, subject: str, config: Config) -> TuneOutcome:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        model = current_joint_model(catalog, config, base)
        found = load_subject(catalog, subject)
        have = set(catalog.read("negatives").column("negative_id").to_pylist())
        negatives = make_jedi_negatives(catalog, found, config, parts, base, model)
        made = sum(n["negative_id"] not in have for n in negatives)
        return TuneOutcome(found.name, "negatives (jedi)", model, [f"{made} negatives"] if made else [],
                           [f"{len(negatives) - made} negatives"] if len(negatives) > made else [], negatives)


@task(name="tune-sfo-joint")
def sfo_joint_task(catalog_root: Path, config: Config) -> TuneOutcome:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        model = current_joint_model(catalog, config, base)
        have = set(catalog.read("models").column("model_id").to_pylist())
        row = train_sfo_joint(catalog, config, parts, base, model, say=get_run_logger().info)
        made = row["model_id"] not in have
        return TuneOutcome("all subjects", "sfo (joint)", row, [f"sfo-joint model {row['model_id']}"] if made else [],
                           [] if made else [f"sfo-joint model {row['model_id']}"])


@task(name="generate-samples", task_run_name="generate-{subject}-{method}")
def generate_task(catalog_root: Path, subject: str | None, method: str, prompt: str, n: int, config: Config,
                  adapter_id: str | None = None, references: int | None = None) -> list[dict]:
    with device_slot():
        catalog = Catalog.open(catalog_root)
        parts, base = open_model(catalog, config)
        found = load_subject(catalog, subject) if subject else None
        if method in JEDI_METHODS:
            if found is None:
                raise TuningError("JeDi generation completes a subject's photo set: name a subject")
            model = current_joint_model(catalog, config, base)
            sfo = current_sfo_joint_model(catalog, config, base, model) if method == "jedi-sfo" else None
            return generate_jedi_samples(catalog, config, parts, base, prompt, n, found, model, references, sfo)
        if adapter_id is None and method != "base":
            adapter_id = current_adapter(catalog, found, method, config, base)
        return generate_samples(catalog, config, parts, base, prompt, n, found, adapter_id, method)
