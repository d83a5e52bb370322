"""Where a command's tasks run (`execution.engine`): the flow's own threads, a Dask or a Ray cluster.

Flows stay as they are; a command (or the refresh, for its deployment) enters
`engine(config)` once and runs its flows `on_engine`. Under a cluster the engine places
the work: a model task asks for one GPU (`model_work`): Dask's "GPU" worker resource (a
worker started with `--resources GPU=1`, one per GPU, each with its own
CUDA_VISIBLE_DEVICES) or Ray's `num_gpus`, which sets CUDA_VISIBLE_DEVICES itself.
Tuning and evaluation run there, and so do CPU tasks, on any worker: ingest's photo
batches, joint-set building and the dashboard's thumbnails. Attaching a flow to a
running cluster costs no more than the local engine; starting one costs seconds
(bench/scaleout.py), which is why `execution.address` empty (a local cluster per
command) is for trying the engine out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner

from subjectflow.catalog.blobstore import BlobStore
from subjectflow.catalog.layout import WORK_DIR
from subjectflow.config import Config, ConfigError, ExecutionConfig, stable_hash
from tasks.tune import device_slots, device_task_runner, ensure_gpu_limit_task

MODEL_RESOURCE = "GPU"  # the Dask worker resource a model task takes one of
EXTRAS = {"dask": ("prefect_dask", "distributed"), "ray": ("prefect_ray", "ray")}
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # tasks pass ids and small rows; Ray's default takes 30% of RAM
RESULTS_DIR = "results"  # engine tasks' kept results, under the work folder (on_workers)


def task_runner(engine_name: str, address: str) -> TaskRunner:
    if engine_name == "local":
        return device_task_runner()
    if not address:
        raise ConfigError(f"execution.engine {engine_name}: run flows inside `engine(config)`, which sets "
                          "execution.address")
    if engine_name == "dask":
        from prefect_dask import DaskTaskRunner as runner
    else:
        from prefect_ray import RayTaskRunner as runner  # finds the Ray that `engine` connected to
    return _lean(runner)(address=address)


@functools.lru_cache(maxsize=None)
def _lean(runner: type[TaskRunner]) -> type[TaskRunner]:
    """`runner` submitting each task with its flow run's context minus the flow's parameters."""

    class Lean(runner):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            with without_flow_parameters():
                return super().submit(*args, **kwargs)

    Lean.__name__ = Lean.__qualname__ = runner.__name__  # what Prefect's logs and UI show
    return Lean


@contextlib.contextmanager
def without_flow_parameters() -> Iterator[None]:
    """The flow run's context, its parameters left out, while the block runs. An engine
    ships the submitting flow's context with every task, its parameters twice (the run's
    and the context's own): a flow given 10,000 subject names made each task 344 KB. A
    task takes what it needs as arguments; on the worker it still runs under its flow run."""
    context = FlowRunContext.get()
    if context is None or not context.parameters:
        yield
        return
    flow_run = context.flow_run.model_copy(update={"parameters": {}}) if context.flow_run else None
    with context.model_copy(update={"parameters": {}, "flow_run": flow_run}):
        yield


def in_batches(items: list, size: int) -> list[list]:
    """`items` in order, `size` to a task."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def on_engine(flow: Any, config: Config) -> Any:
    """`flow` with its tasks on the configured engine."""
    return _on_runner(flow, config.execution.engine, config.execution.address)


@functools.lru_cache(maxsize=None)
def _on_runner(flow: Any, engine_name: str, address: str) -> Any:
    # One copy per flow and engine: each copy builds the flow's parameter schema again (0.1 s
    # with a Config in it, every stage of every refresh), and each run duplicates the runner.
    return flow.with_options(task_runner=task_runner(engine_name, address))


def on_workers(task: Any, config: Config, catalog_root: Path) -> Any:
    """`task` as engine workers run it: its result kept under its task run's id in
    `shared_results`. Dask re-runs a finished task whose result died with its worker, and
    Ray rebuilds a lost one the same way; the re-run, the same task run, finds the kept
    result and returns it instead of doing the work again. `forget_results` deletes each
    once the flow has committed it."""
    if config.execution.engine == "local":
        return task
    return task.with_options(persist_result=True, result_storage=shared_results(config, catalog_root),
                             result_storage_key="{task_run.id}")


def workers_store(config: Config) -> str:
    """The blob store engine workers put what they make to ("" = the catalog folder). The
    local engine's tasks run in the flow's own process, beside the catalog: they need none."""
    return "" if config.execution.engine == "local" else config.execution.blob_store


def shared_results(config: Config, catalog_root: Path) -> Any:
    """Prefect result storage every worker can read: the blob store, else the catalog's
    work folder. A worker's own default (~/.prefect/storage) would not do: the task a
    worker re-runs for a dead one finds its run completed, and reads its result from here."""
    uri = workers_store(config)
    if uri:
        from prefect.filesystems import RemoteFileSystem

        storage = RemoteFileSystem(basepath=f"{uri}/{WORK_DIR}/{RESULTS_DIR}")
    else:
        from prefect.filesystems import LocalFileSystem

        storage = LocalFileSystem(basepath=str(catalog_root / WORK_DIR / RESULTS_DIR))
    # Saved, so that a worker can find it from the result's record (by the block's id).
    storage.save(f"subjectflow-results-{stable_hash(storage.basepath)}", overwrite=True)
    return storage


def forget_results(config: Config, catalog_root: Path, keys: Iterable[str]) -> None:
    """Delete kept results (by their keys in `shared_results`) the flow is done with."""
    keys = [f"{WORK_DIR}/{RESULTS_DIR}/{key}" for key in keys]
    if uri := workers_store(config):
        BlobStore(uri).delete(keys)
        return
    for key in keys:
        (catalog_root / key).unlink(missing_ok=True)


def limit_devices(config: Config) -> None:
    """On a Prefect server, one model task per local device across runs (tasks/tune.py's
    slots). Under an engine its resources are the only limit."""
    if config.execution.engine == "local":
        ensure_gpu_limit_task(device_slots())


@contextlib.contextmanager
def model_work(config: Config, gpus: int = 1) -> Iterator[None]:
    """Tasks submitted in the block each take `gpus` devices: the engine's GPU resource
    (a data-parallel job takes several on one node; training/parallel.py)."""
    engine_name = config.execution.engine
    if engine_name == "local":
        yield  # the tasks' own device slots (tasks/tune.py) place them
        return
    most = _most_gpus_on_a_node(config.execution) if gpus > 1 else gpus
    if gpus > most:  # the engine would wait for such a worker forever
        raise ConfigError(f"a task needs {gpus} GPUs on one node and the {engine_name} cluster's largest worker "
                          f"offers {most}; start a worker with that many (Dask: --resources GPU={gpus}) or lower "
                          f"joint.devices")
    if engine_name == "dask":
        import dask

        with dask.annotate(resources={MODEL_RESOURCE: gpus}):
            yield
        return
    from prefect_ray.context import remote_options

    # Ray retires a GPU task's process after one call unless told otherwise: max_calls=0
    # keeps the worker, and with it the resident base model (models/resident.py).
    with remote_options(num_gpus=gpus, max_calls=0):
        yield


def _most_gpus_on_a_node(execution: ExecutionConfig) -> float:
    if execution.engine == "dask":
        from distributed import Client

        with Client(execution.address) as client:
            workers = client.scheduler_info()["workers"].values()
        return max((w.get("resources", {}).get(MODEL_RESOURCE, 0) for w in workers), default=0)
    import ray

    return max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]), default=0)


@contextlib.contextmanager
def engine(config: Config) -> Iterator[Config]:
    """The engine for one command; yields `config` pointing at it. With no address, a
    local cluster of `execution.workers` workers (Dask processes, or Ray GPU slots) lives
    for the block."""
    execution = config.execution
    if execution.engine == "local":
        yield config
        return
    try:
        for module in EXTRAS[execution.engine]:  # what task_runner needs, checked before any work
            importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"execution.engine {execution.engine} needs {execution.engine.capitalize()}: "
                          f"pip install 'subjectflow[{execution.engine}]'") from None
    if execution.address and not PREFECT_API_URL.value():
        raise ConfigError(
            f"execution.address {execution.address}: a cluster's workers report to a Prefect server, and none is "
            f"set; run `prefect server start` and set PREFECT_API_URL=http://<that host>:4200/api")
    cluster = _dask_cluster if execution.engine == "dask" else _ray_cluster
    with cluster(execution) as address:
        yield config.model_copy(update={"execution": execution.model_copy(update={"address": address})})


@contextlib.contextmanager
def _dask_cluster(execution: ExecutionConfig) -> Iterator[str]:
    if execution.address:
        yield execution.address
        return
    from distributed import LocalCluster

    # Prefect's console handler would show the scheduler's and nannies' INFO chatter.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with prefect_api(), LocalCluster(
            n_workers=execution.workers, threads_per_worker=execution.worker_gpus + 1, processes=True,
            resources={MODEL_RESOURCE: execution.worker_gpus}, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@contextlib.contextmanager
def _ray_cluster(execution: ExecutionConfig) -> Iterator[str]:
    import ray

    if execution.address:
        ray.init(address=execution.address, logging_level=logging.WARNING)
        try:
            yield execution.address
        finally:
            ray.shutdown()  # the driver's connection; the cluster stays
        return
    gpus = execution.workers * execution.worker_gpus
    with prefect_api():  # before ray.init: the raylet, and so every worker, inherits PREFECT_API_URL
        ray.init(num_cpus=gpus + execution.workers, num_gpus=gpus, include_dashboard=False,
                 object_store_memory=RAY_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


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
