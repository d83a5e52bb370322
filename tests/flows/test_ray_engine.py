"""The flows on a real local Ray cluster with 2 fake GPUs: model tasks placed by num_gpus."""

from __future__ import annotations

import ray
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.engine import engine, on_engine
from flows.tune import tune_flow
from tests.training.conftest import adapter_files, ingested_catalog, tiny_config

SUBJECTS = ("red_mug", "blue_box", "vase", "teapot")


@ray.remote(num_gpus=1, max_calls=0)
def _resident_counts() -> tuple[int, int, int]:
    """In a worker that holds a GPU: (pid, base-model loads, resident reuses) so far."""
    import os

    from subjectflow.models.resident import RESIDENT

    return os.getpid(), RESIDENT.loads, RESIDENT.hits


def _spans(flow_run_id) -> list[tuple[float, float]]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs if r.name.startswith("tune-")]


def test_tuning_on_ray_makes_the_local_engines_adapters_two_gpus_two_model_tasks_at_most(tmp_path):
    on_ray = ingested_catalog(tmp_path / "ray", subjects=SUBJECTS, per_subject=2)
    config = tiny_config(execution={"engine": "ray", "workers": 2})
    with engine(config) as placed:
        state = on_engine(tune_flow, placed)(str(on_ray.root), "sft", None, placed, return_state=True)
        # Both GPU slots' processes outlived their tasks and kept the base model between them.
        counts = ray.get([_resident_counts.remote() for _ in range(2)])
    run = state.result()
    assert not run.failures and sorted(o.subject for o in run.outcomes) == sorted(SUBJECTS)

    # 4 CPU slots would run all four at once: the GPU request is what kept it to two.
    spans = _spans(state.state_details.flow_run_id)
    assert len(spans) == len(SUBJECTS)
    assert max(sum(start <= t < stop for start, stop in spans) for t, _ in spans) <= 2, spans
    assert sum(loads for _, loads, _ in counts) <= 2 and sum(hits for _, _, hits in counts) >= 2, counts

    local = ingested_catalog(tmp_path / "local", subjects=SUBJECTS, per_subject=2)
    assert not tune_flow(str(local.root), "sft", None, tiny_config()).failures
    assert adapter_files(on_ray) == adapter_files(local) and len(adapter_files(local)) == len(SUBJECTS)
