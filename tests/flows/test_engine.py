"""The flows on a real local Dask cluster: 2 worker processes, each advertising one fake GPU."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import yaml
from distributed import Client, LocalCluster, WorkerPlugin, get_task_stream
from prefect import flow, task
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.dashboard import dashboard_flow
from flows.engine import MODEL_RESOURCE, engine, on_engine, on_workers
from flows.evaluate import evaluate_flow
from flows.joint import jointsets_flow
from flows.tune import tune_flow, wait_all
from subjectflow.catalog.blobstore import BlobStore
from subjectflow.config import ConfigError
from subjectflow.dashboard import build_dashboard
from subjectflow.s3 import s3_client
from tests.flows.test_busy_machine import _command
from tests.training.conftest import adapter_files, ingested_catalog, tiny_config

SUBJECTS = ("red_mug", "blue_box", "vase", "teapot")


@pytest.fixture(scope="module")
def cluster(s3_endpoint):  # started after the S3 endpoint, so the workers inherit AWS_ENDPOINT_URL
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, resources={MODEL_RESOURCE: 1},
                      dashboard_address=None) as running:
        yield running


def _record_catalog_locks() -> None:
    """In a worker: note every catalog write lock taken from now on."""
    import subjectflow.catalog.store as store

    class Recording(store.FileLock):
        def acquire(self, *args, **kwargs):
            store.locks_taken.append(str(self.lock_file))
            return super().acquire(*args, **kwargs)

    store.locks_taken, store.FileLock = [], Recording


def _catalog_locks_taken() -> list[str]:
    import subjectflow.catalog.store as store

    return store.locks_taken


def _resident_reuses() -> int:
    from subjectflow.models.resident import RESIDENT

    return RESIDENT.hits


def _scores(catalog) -> dict[tuple[str, str], float]:
    return {(row["subject_id"], row["metric"]): row["value"] for row in catalog.read("metrics").to_pylist()}


def test_tuning_and_evaluation_on_the_cluster_and_an_s3_store_make_the_local_engines_tables_one_task_per_gpu(
        tmp_path, cluster):
    quick = {"evaluate": {"methods": ["sft"], "prompts": 1, "images_per_prompt": 1}}
    on_dask = ingested_catalog(tmp_path / "dask", subjects=SUBJECTS, per_subject=2)
    s3_client().create_bucket(Bucket="scored-blobs")
    store = BlobStore("s3://scored-blobs/nightly")
    config = tiny_config(**quick, execution={"engine": "dask", "address": cluster.scheduler_address,
                                             "blob_store": store.uri})
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        client.run(_record_catalog_locks)
        with engine(config) as placed:
            run = on_engine(tune_flow, placed)(str(on_dask.root), "sft", None, placed)
            scored = on_engine(evaluate_flow, placed)(str(on_dask.root), None, None, placed)
        # the workers staged their rows and the flow wrote them: no worker took the lock
        assert client.run(_catalog_locks_taken) == {worker: [] for worker in client.scheduler_info()["workers"]}
        # each worker's later model tasks found the base model its first one loaded
        assert all(hits >= 1 for hits in client.run(_resident_reuses).values())
    assert not run.failures and sorted(o.subject for o in run.outcomes) == sorted(SUBJECTS)
    assert not scored.failures and len(scored.scored) == len(SUBJECTS)
    # evaluation's samples went through the S3 store too, and are in the catalog before their rows
    samples = [row["file"] for row in on_dask.read("samples").to_pylist()]
    assert sorted(f.removeprefix("blobs/samples/") for f in samples) == store.names("blobs/samples")
    assert samples and all((on_dask.root / f).is_file() for f in samples)

    local = ingested_catalog(tmp_path / "local", subjects=SUBJECTS, per_subject=2)
    assert not tune_flow(str(local.root), "sft", None, tiny_config(**quick)).failures
    assert not evaluate_flow(str(local.root), None, None, tiny_config(**quick)).failures
    assert adapter_files(on_dask) == adapter_files(local) and len(adapter_files(local)) == len(SUBJECTS)
    assert _scores(on_dask) == _scores(local) and len(_scores(local)) >= len(SUBJECTS)

    # Each worker has 2 threads but one GPU: its model tasks' compute never overlapped, and
    # both worked. Only "compute" holds the resource. The stamps are the worker's, taken in
    # its threads: on a loaded CI box one stop came 0.25 s after the next start, against a
    # whole task's ~1 s of overlap without the GPU annotation, hence the 0.5 s allowance.
    computes = [(t["worker"], [s for s in t["startstops"] if s["action"] == "compute"])
                for t in stream.data if t["key"].startswith("tune_task")]
    spans = [(worker, min(s["start"] for s in parts), max(s["stop"] for s in parts)) for worker, parts in computes]
    assert len(spans) == len(SUBJECTS) and len({worker for worker, _, _ in spans}) == 2
    for worker in {w for w, _, _ in spans}:
        mine = sorted((start, stop) for w, start, stop in spans if w == worker)
        assert all(next_start > stop - 0.5 for (_, stop), (next_start, _) in zip(mine, mine[1:])), mine


@task
def _flow_run_on_a_worker() -> tuple[str, dict, dict]:
    context = FlowRunContext.get()
    return str(context.flow_run.id), context.parameters, context.flow_run.parameters


def test_a_task_on_the_engine_runs_under_its_flow_run_without_the_flows_subject_list(cluster):
    @flow
    def stage(subjects: list[str]):
        here = FlowRunContext.get()
        return str(here.flow_run.id), _flow_run_on_a_worker.submit().result(), here.parameters

    names = [f"subject-{i:05d}" for i in range(1000)]
    config = tiny_config(execution={"engine": "dask", "address": cluster.scheduler_address})
    flow_run_id, (seen_id, parameters, run_parameters), after = on_engine(stage, config)(names)
    assert seen_id == flow_run_id and parameters == {} and run_parameters == {}
    assert after == {"subjects": names}  # the flow's own context is whole again


def _rows(catalog, table: str, but: str = "") -> list[dict]:
    rows = [{k: v for k, v in row.items() if not k.endswith("_at") and k != but}
            for row in catalog.read(table).to_pylist()]
    return sorted(rows, key=lambda row: sorted(row.items()))


def _set_pixels(catalog) -> dict[str, list[bytes]]:
    from subjectflow.jointsets import read_sets

    shards = sorted({row["shard"] for row in catalog.read("jointsets").to_pylist()})
    return {s.set_id: [image.tobytes() for image in s.images] for s in read_sets(catalog, shards)}


def _kept_results(flow_run_id, task_name: str) -> list[tuple[str, str]]:
    """Where a flow run's `task_name` tasks had their results kept: (storage basepath, key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [(client.read_block_document(r.state.data.storage_block_id).data["basepath"], r.state.data.storage_key)
                for r in runs if r.name.startswith(task_name)]


def test_ingest_jointsets_and_thumbnails_spread_over_the_workers_and_make_the_local_engines_tables_and_site(
        tmp_path, cluster):
    from flows.ingest import ingest_flow
    from subjectflow.catalog import init_catalog
    from tests.photos import photo_set

    source = str(photo_set(tmp_path / "src", subjects=SUBJECTS, per_subject=2))
    batches = {"batch_size": 2}
    s3_client().create_bucket(Bucket="ingest-blobs")
    store = BlobStore("s3://ingest-blobs/nightly")
    on_dask = init_catalog(tmp_path / "dask", tiny_config())
    config = tiny_config(ingest=batches, execution={"engine": "dask", "address": cluster.scheduler_address,
                                                    "blob_store": store.uri})
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        with engine(config) as placed:
            state = on_engine(ingest_flow, placed)(source, str(on_dask.root), placed, return_state=True)
    run = state.result()
    assert run.report.balanced and run.report.ingested == 2 * len(SUBJECTS)
    # CPU work asks for no GPU: both workers took batches, several at once
    assert len({t["worker"] for t in stream.data if t["key"].startswith("process_photos_task")}) == 2
    # the workers put every photo's blobs to S3, and the catalog holds them before its rows name them
    normalised = [row["normalised_file"] for row in on_dask.read("images").to_pylist()]
    assert sorted(f.removeprefix("blobs/normalised/") for f in normalised) == store.names("blobs/normalised")
    assert all((on_dask.root / f).is_file() for f in normalised)
    # each batch's result was kept where any worker can read it, not in a worker's home, and
    # went once the flow had recorded its photos
    kept = _kept_results(state.state_details.flow_run_id, "process-photos")
    assert len(kept) == 4 and {where for where, _ in kept} == {f"{store.uri}/work/results"}  # 8 photos, 2 a batch
    assert store.names("work/results") == []

    local = init_catalog(tmp_path / "local", tiny_config())
    ingest_flow(source, str(local.root), tiny_config(ingest=batches))
    assert list((local.root / "work" / "results").glob("*")) == []  # kept in the catalog's work folder, then gone
    for table in ("images", "subjects", "quarantine"):
        assert _rows(on_dask, table) == _rows(local, table), table

    # Joint sets from those photos: a task per subject over both workers, shards through the store.
    sets = {"jointsets": {"subjects_per_task": 1, "sets_per_subject": 2}}
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        with engine(tiny_config(**sets, execution=config.execution.model_dump())) as placed:
            joint = on_engine(jointsets_flow, placed)(str(on_dask.root), None, placed)
    assert not joint.failures and sum(joint.report.made.values()) == 2 * len(SUBJECTS)
    assert len({t["worker"] for t in stream.data if t["key"].startswith("make_jointsets_task")}) == 2
    shards = {row["shard"] for row in on_dask.read("jointsets").to_pylist()}
    assert sorted(f.removeprefix("blobs/jointsets/") for f in shards) == store.names("blobs/jointsets")
    assert all((on_dask.root / f).is_file() for f in shards)
    jointsets_flow(str(local.root), None, tiny_config(**sets))
    # the same sets, member for member and pixel for pixel; only their packing into shards differs
    assert _rows(on_dask, "jointsets", but="shard") == _rows(local, "jointsets", but="shard")
    assert _set_pixels(on_dask) == _set_pixels(local)

    # The dashboard's thumbnails, a few to a task over both workers: the same site as built here.
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        few = tiny_config(execution={**config.execution.model_dump(), "thumbnails_per_task": 4})
        with engine(few) as placed:
            site = on_engine(dashboard_flow, placed)(str(on_dask.root), str(tmp_path / "site"), config=placed)
    assert len({t["worker"] for t in stream.data if t["key"].startswith("make_thumbnails_task")}) == 2
    here = build_dashboard(on_dask, tmp_path / "site-here")
    assert site.thumbs_written == here.thumbs_written >= 4 * len(SUBJECTS) and not site.missing
    thumbs = {p.name: p.read_bytes() for p in (tmp_path / "site" / "thumbs").iterdir()}
    assert thumbs == {p.name: p.read_bytes() for p in (tmp_path / "site-here" / "thumbs").iterdir()}


class _RecordStoreReads(WorkerPlugin):
    """In every worker, the nanny's replacement for a killed one included: note each object
    read from the blob store."""

    def setup(self, worker) -> None:
        import subjectflow.s3 as s3

        s3.reads = []
        s3.s3_client().meta.events.register("before-parameter-build.s3.GetObject",
                                            lambda params, **_: s3.reads.append(params["Key"]))


def _store_reads() -> list[str]:
    import subjectflow.s3 as s3

    return getattr(s3, "reads", [])


def _kill_a_worker_mid_training(client: Client, store: BlobStore, killed: list[str]) -> None:
    """SIGKILL a worker busy with a model task once both subjects have kept a checkpoint, so
    whichever task dies has one to resume from."""
    deadline = time.monotonic() + 300
    while len({name.split("/")[0] for name in store.names("work/tune")}) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = [worker for worker, keys in client.processing().items() if keys]
    if busy:
        os.kill(client.run(os.getpid, workers=busy[:1])[busy[0]], signal.SIGKILL)
        killed.append(busy[0])


def test_a_worker_killed_mid_training_costs_only_a_retry_that_resumes_from_the_s3_blob_store(tmp_path, cluster):
    """The workers share no writable folder with the flow: blobs and checkpoints go to S3."""
    s3_client().create_bucket(Bucket="engine-blobs")
    store = BlobStore("s3://engine-blobs/nightly")
    settings = {"train": {"steps": 60, "checkpoint_every": 10}}
    on_dask = ingested_catalog(tmp_path / "dask", per_subject=2)
    config = tiny_config(**settings, execution={"engine": "dask", "address": cluster.scheduler_address,
                                                "blob_store": store.uri})
    killed: list[str] = []
    with Client(cluster.scheduler_address) as client:
        client.register_plugin(_RecordStoreReads(), name="record-store-reads")
        killer = threading.Thread(target=_kill_a_worker_mid_training, args=(client, store, killed))
        killer.start()
        with engine(config) as placed:
            run = on_engine(tune_flow, placed)(str(on_dask.root), "sft", None, placed)
        killer.join()
        reads = [key for keys in client.run(_store_reads).values() for key in keys]
        client.unregister_worker_plugin("record-store-reads")
    assert killed and not run.failures and len(run.outcomes) == 2
    assert any("/work/tune/" in key and "/checkpoint-" in key for key in reads), reads  # the retry resumed
    assert not (on_dask.root / "work" / "tune").exists()  # no worker wrote checkpoints into the catalog
    assert store.names("work/results") == []  # the tasks' kept results, in S3, went once committed
    made = [row["file"] for row in on_dask.read("adapters").to_pylist()]
    assert sorted(f.removeprefix("blobs/adapters/") for f in made) == store.names("blobs/adapters")
    assert all((on_dask.root / f).is_file() for f in made)  # the flow copied them in before committing

    uninterrupted = ingested_catalog(tmp_path / "local", per_subject=2)
    assert not tune_flow(str(uninterrupted.root), "sft", None, tiny_config(**settings)).failures
    assert adapter_files(on_dask) == adapter_files(uninterrupted)


class _DieAfterFinishing(WorkerPlugin):
    """In every worker: log each model task it starts, and SIGKILL the first worker that
    holds a finished one's result, before the flow could fetch it (once: a file claims it)."""

    def __init__(self, folder) -> None:
        self.claim, self.log = str(folder / "killed"), str(folder / "started")

    def transition(self, key, start, finish, **kwargs) -> None:
        if not str(key).startswith("tune_task"):
            return
        if finish == "executing":
            with open(self.log, "a") as log:
                log.write(f"{key}\n")
        if finish == "memory":
            try:
                os.close(os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            with open(self.claim, "w") as claim:
                claim.write(str(key))
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_finished_task_whose_result_died_with_its_worker_is_rerun_by_dask_and_returns_its_kept_result(
        tmp_path, cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    on_dask = ingested_catalog(tmp_path / "dask", per_subject=2)
    config = tiny_config(execution={"engine": "dask", "address": cluster.scheduler_address})
    with Client(cluster.scheduler_address) as client:
        client.register_plugin(_DieAfterFinishing(tmp_path), name="die-after-finishing")
        with engine(config) as placed:
            state = on_engine(tune_flow, placed)(str(on_dask.root), "sft", None, placed, return_state=True)
        client.unregister_worker_plugin("die-after-finishing")
    run = state.result()
    assert not run.failures and len(run.outcomes) == 2
    killed = (tmp_path / "killed").read_text()
    assert (tmp_path / "started").read_text().split().count(killed) == 2  # Dask ran the finished task again

    with get_client(sync_client=True) as api:
        ours = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        tunes = [t for t in api.read_task_runs(flow_run_filter=ours) if t.name.startswith("tune-sft-")]
        ends = {t.name: [s.name for s in api.read_task_run_states(t.id) if s.type == StateType.COMPLETED]
                for t in tunes}
    # ...and the re-run, the same task run, returned its kept result ("Cached"): none trained
    # twice. The killed worker's own "Completed" may not reach the server before SIGKILL.
    assert sorted(ends.values()) in ([["Cached"], ["Completed"]], [["Completed"], ["Completed", "Cached"]]), ends
    assert not list((on_dask.root / "work" / "results").iterdir())  # each kept result went once committed
    uninterrupted = ingested_catalog(tmp_path / "local", per_subject=2)
    assert not tune_flow(str(uninterrupted.root), "sft", None, tiny_config()).failures
    assert adapter_files(on_dask) == adapter_files(uninterrupted)


@pytest.mark.parametrize("name, address", [("dask", "tcp://10.0.0.1:8786"), ("ray", "ray://10.0.0.1:10001")])
def test_a_remote_cluster_without_a_prefect_server_fails_fast_with_what_to_run(name, address):
    config = tiny_config(execution={"engine": name, "address": address})
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ConfigError, match="prefect server start"):
        with engine(config):
            pass


def _servers_and_workers() -> set[int]:
    """Prefect temporary servers and spawned worker processes now alive on this machine."""
    found = set()
    for proc in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
        except (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError):
            continue
        if b"uvicorn" in cmdline or b"spawn_main" in cmdline:
            found.add(int(proc))
    return found


def test_a_command_without_a_server_runs_a_local_cluster_on_its_own_server_and_leaves_nothing_behind(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    before = _servers_and_workers()
    done = _command(tmp_path, "tune", "--method", "sft", "--all", "--catalog", str(catalog.root),
                    "--set", "execution.engine=dask")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["subject_id"] for row in catalog.read("adapters").to_pylist()] == ["vase"]
    assert "Timed out" not in done.stderr and "distributed.scheduler" not in done.stderr
    deadline = time.monotonic() + 10  # a terminated server may take a moment to exit
    while _servers_and_workers() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _servers_and_workers() - before


class _GivenUp:
    """What a Dask task's future raises once Dask stops re-running it after worker deaths."""

    from prefect.states import Running

    state = Running()  # what the server last heard of its task run: no result of any kind was kept

    def result(self):
        from types import SimpleNamespace

        from distributed import KilledWorker

        raise KilledWorker("tune-sft-red_mug", SimpleNamespace(address="tcp://127.0.0.1:40000"), 3)


class _Finished:
    def result(self):
        return "adapter"


def test_a_subject_the_engine_gave_up_on_is_reported_failed_and_the_others_kept(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=1)
    results, failures = wait_all([_GivenUp(), _Finished()], ["red_mug", "blue_box"], catalog.root, tiny_config())
    assert results == {"blue_box": "adapter"}
    assert failures["red_mug"].startswith("KilledWorker: ") and "tune-sft-red_mug" in failures["red_mug"]


class _ServerGone(_GivenUp):
    @property
    def state(self):  # what the flow asks the server once the engine gave the task up
        raise ConnectionError("the Prefect server went away")


def test_failed_tasks_errors_that_cannot_be_deleted_cost_nothing_else(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=1)
    results, failures = wait_all([_ServerGone(), _Finished()], ["red_mug", "blue_box"], catalog.root, tiny_config())
    assert results == {"blue_box": "adapter"} and failures["red_mug"].startswith("KilledWorker: ")


@task(name="fails-on-a-worker")
def _fails(subject: str) -> None:
    raise ValueError(f"{subject}: no photos")


def test_a_failed_tasks_kept_error_goes_once_reported(tmp_path):
    root = tmp_path / "catalog"
    config = tiny_config(execution={"engine": "dask", "address": "tcp://127.0.0.1:1"})  # wait_all needs no cluster

    @flow
    def stage():
        futures = [on_workers(_fails, config, root).submit(s) for s in ("red_mug", "vase")]
        return wait_all(futures, ["red_mug", "vase"], root, config)

    results, failures = stage()
    assert results == {} and failures["vase"] == "ValueError: vase: no photos"
    assert not list((root / "work" / "results").iterdir())  # Prefect had kept each error there


def test_the_refresh_command_takes_the_engine_settings():
    from flows.cli import _overrides, build_parser

    args = build_parser().parse_args(["refresh", "--set", "execution.engine=dask",
                                      "--set", "execution.address=tcp://head:8786"])
    assert _overrides(args)["execution"] == {"engine": "dask", "address": "tcp://head:8786"}


def test_the_joint_model_takes_a_two_gpu_worker_for_two_ranks_and_is_refused_where_none_is_that_large(tmp_path):
    from subjectflow.jointsets import build_jointsets

    catalog = ingested_catalog(tmp_path, per_subject=2)
    sets = {"resolution": 32, "sets_per_subject": 2}
    build_jointsets(catalog, tiny_config(jointsets=sets).jointsets, say=lambda _: None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={MODEL_RESOURCE: 2},
                      dashboard_address=None) as node:
        def joint(devices: int):
            config = tiny_config(jointsets=sets, joint={"steps": 2, "devices": devices},
                                 train={"gradient_accumulation": devices},  # a micro-batch per rank
                                 execution={"engine": "dask", "address": node.scheduler_address})
            with engine(config) as placed:
                return on_engine(tune_flow, placed)(str(catalog.root), "jedi", None, placed)

        with pytest.raises(ConfigError, match="needs 3 GPUs on one node .* offers 2"):
            joint(3)
        run = joint(2)  # two rank processes launched from inside the (daemonic) Dask worker
    assert not run.failures and [o.made for o in run.outcomes]
    assert list((catalog.root / "work" / "joint").glob("*/rank-1.log"))
    assert len(catalog.read("models").to_pylist()) == 1
