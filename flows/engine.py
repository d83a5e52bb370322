"""Where a command's tasks run (`execution.engine`): the flow's own threads, or a Dask cluster.

Flows stay as they are; a command (or the refresh, for its deployment) enters
`engine(config)` once and runs its flows `on_engine`. Under Dask the engine places the
work: a model task asks for one "GPU" resource (`model_work`), so a worker started with
`--resources GPU=1` (one per GPU, each with its own CUDA_VISIBLE_DEVICES) runs one at a
time. Tuning and evaluation run there; ingest, joint sets and the dashboard still run in
the flow's process. Attaching a flow to a running cluster costs no more
than the local engine; starting one costs ~9 s (bench/scaleout.py), which is why
`execution.address` empty (a local cluster per command) is for trying the engine out.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner

from subjectflow.config import Config, ConfigError
from tasks.tune import device_slots, device_task_runner, ensure_gpu_limit_task

MODEL_RESOURCE = "GPU"


def task_runner(config: Config) -> TaskRunner:
    if config.execution.engine == "local":
        return device_task_runner()
    from prefect_dask import DaskTaskRunner

    if not config.execution.address:
        raise ConfigError("execution.engine dask: run flows inside `engine(config)`, which sets execution.address")
    return DaskTaskRunner(address=config.execution.address)


def on_engine(flow: Any, config: Config) -> Any:
    """`flow` with its tasks on the configured engine."""
    return flow.with_options(task_runner=task_runner(config))


def limit_devices(config: Config) -> None:
    """On a Prefect server, one model task per local device across runs (tasks/tune.py's
    slots). Under an engine its resources are the only limit."""
    if config.execution.engine == "local":
        ensure_gpu_limit_task(device_slots())


@contextlib.contextmanager
def model_work(config: Config) -> Iterator[None]:
    """Tasks submitted in the block each take one device: the engine's GPU resource."""
    if config.execution.engine == "local":
        yield  # the tasks' own device slots (tasks/tune.py) place them
        return
    import dask

    with dask.annotate(resources={MODEL_RESOURCE: 1}):
        yield


@contextlib.contextmanager
def engine(config: Config) -> Iterator[Config]:
    """The engine for one command; yields `config` pointing at it. With Dask and no
    address, a local cluster of `execution.workers` processes lives for the block."""
    execution = config.execution
    if execution.engine == "local":
        yield config
        return
    try:
        import prefect_dask  # noqa: F401 - what task_runner needs, checked before any work
        from distributed import LocalCluster
    except ImportError:
        raise ConfigError("execution.engine dask needs Dask: pip install 'subjectflow[dask]'") from None
    if execution.address:
        if not PREFECT_API_URL.value():
            raise ConfigError(
                f"execution.address {execution.address}: a cluster's workers report to a Prefect server, and none is "
                f"set; run `prefect server start` and set PREFECT_API_URL=http://<that host>:4200/api")
        yield config
        return
    # Prefect's console handler would show the scheduler's and nannies' INFO chatter.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with prefect_api(), LocalCluster(
            n_workers=execution.workers, threads_per_worker=execution.worker_gpus + 1, processes=True,
            resources={MODEL_RESOURCE: execution.worker_gpus}, dashboard_address=None) as cluster:
        yield config.model_copy(update={"execution": execution.model_copy(update={"address": cluster.scheduler_address})})


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The flow's Prefect API, for the local workers too. Left alone, each worker process
    would start its own temporary server, which times out on a busy machine and outlives it."""
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # inside a flow: the one that flow already reports to
    started_here = not server.running
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")))
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # what the spawned workers read
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        if started_here:
            server.stop()
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
