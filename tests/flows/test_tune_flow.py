"""tune / negatives / generate flows end to end on the tiny model, under the Prefect harness."""

import pyarrow.dataset as ds
import yaml

from flows.cli import main
from flows.tune import tune_flow
from subjectflow.catalog import list_versions
from tests.training.conftest import ingested_catalog, tiny_config


def test_the_tune_flow_tunes_every_stale_subject_and_versions_the_catalog(tmp_path):
    catalog = ingested_catalog(tmp_path)
    config = tiny_config()
    run = tune_flow(str(catalog.root), "sfo", None, config)

    assert not run.failures and sorted(o.subject for o in run.outcomes) == ["blue_box", "red_mug"]
    adapters = catalog.read("adapters").to_pylist()
    assert sorted((a["subject_id"], a["method"]) for a in adapters) == [
        ("blue_box", "sfo"), ("blue_box", "sft"), ("red_mug", "sfo"), ("red_mug", "sft")]
    assert ds.dataset(catalog.root / "tables" / "negatives").count_rows() == 6  # 3 photos x 1 per photo x 2
    assert run.version is not None and list_versions(catalog)[0].number == run.version.number
    assert "tune" in (catalog.root / "dvc.lock").read_text()

    again = tune_flow(str(catalog.root), "sfo", None, config)
    assert again.outcomes == [] and again.version is None  # nothing stale: nothing runs, no version


def test_one_failing_subject_does_not_stop_the_others(tmp_path):
    catalog = ingested_catalog(tmp_path)
    run = tune_flow(str(catalog.root), "sft", ["red_mug", "no_such_subject"], tiny_config())
    assert [o.subject for o in run.outcomes] == ["red_mug"]
    assert "no subject 'no_such_subject'" in run.failures["no_such_subject"]


def test_generate_registers_samples_and_names_a_missing_adapter(tmp_path, capfd):
    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    # The CLI reads the catalog's own params.yaml: make it the tiny test settings.
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(tiny_config().model_dump()))

    assert main(["generate", "--subject", "vase", "--method", "sft", "--catalog", str(catalog.root)]) == 2
    assert "subjectflow tune --method sft --subject vase" in capfd.readouterr().err
    assert main(["tune", "--subject", "vase", "--method", "sft", "--catalog", str(catalog.root)]) == 0
    assert main(["generate", "--subject", "vase", "--method", "sft", "--n", "2", "--prompt", "{subject} on the beach",
                 "--catalog", str(catalog.root)]) == 0
    samples = catalog.read("samples").to_pylist()
    assert len(samples) == 2 and {s["prompt"] for s in samples} == {"sks vase on the beach"}
    assert all(catalog.blob_path(s["file"]).exists() and s["adapter_id"] for s in samples)


def test_a_slot_held_elsewhere_fails_the_subject_with_advice_instead_of_hanging(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    import tasks.tune as tune_tasks

    catalog = ingested_catalog(tmp_path, subjects=("vase",), per_subject=2)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(tune_tasks.GPU_LIMIT, 1)
    monkeypatch.setattr(tune_tasks, "SLOT_TIMEOUT_S", 2)
    from prefect.concurrency.sync import concurrency

    with concurrency(tune_tasks.GPU_LIMIT, occupy=1, strict=True):  # e.g. a crashed run's slot
        run = tune_flow(str(catalog.root), "sft", ["vase"], tiny_config())
    assert "prefect gcl update subjectflow-gpu --active-slots 0" in run.failures["vase"]


def test_without_a_prefect_server_device_slots_are_taken_in_process(monkeypatch):
    import tasks.tune as tune_tasks

    monkeypatch.setattr(tune_tasks, "_uses_server", lambda: False)
    config = tiny_config()
    with tune_tasks.device_slot(config) as placed:
        assert tune_tasks._free_devices.empty() and placed is config  # the one CPU slot is taken
    assert tune_tasks._free_devices.qsize() == 1


def test_each_slot_is_a_concrete_gpu_handed_to_the_task_that_takes_it(monkeypatch):
    import torch

    import tasks.tune as tune_tasks

    monkeypatch.setattr(tune_tasks, "_uses_server", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a faked 3-GPU machine
    monkeypatch.setattr(tune_tasks, "_free_devices", tune_tasks._device_queue())
    config = tiny_config()
    with tune_tasks.device_slot(config) as first, tune_tasks.device_slot(config) as second:
        assert (first.model.device, second.model.device) == ("cuda:0", "cuda:1")
        assert tune_tasks._free_devices.qsize() == 1
    assert tune_tasks._free_devices.qsize() == 3
    with tune_tasks.device_slot(tiny_config(model={"device": "cpu"})) as explicit:
        assert explicit.model.device == "cpu"  # the user's own device choice stands


def test_flows_that_map_model_tasks_run_them_on_one_thread_per_device():
    # A thread per mapped subject (Prefect's default) kept thousands of threads' native
    # memory alive in a 1,000-subject refresh.
    import threading

    from prefect import flow, task

    from flows.evaluate import evaluate_flow
    from flows.tune import negatives_flow
    from tasks.tune import device_slots, device_task_runner

    for mapped in (tune_flow, negatives_flow, evaluate_flow):
        assert mapped.task_runner._max_workers == device_slots(), mapped.name

    @task
    def where(_: int) -> int:
        return threading.get_ident()

    @flow(task_runner=device_task_runner())
    def many() -> set[int]:
        return {future.result() for future in where.map(range(12))}

    assert len(many()) <= device_slots()
