"""The joint model as one data-parallel job: two ranks (gloo on this CPU) split each step's
micro-batches, and train the model one process trains."""

from safetensors.torch import load_file

from subjectflow.jointsets import build_jointsets
from subjectflow.methods.jedi.model import train_joint
from subjectflow.training.parallel import Ranks, devices_for
from tests.training.conftest import context, ingested_catalog, tiny_config


def test_ranks_split_a_steps_micro_batches_and_never_outnumber_them():
    assert [list(Ranks(r, 2).micro_batches(5)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert devices_for(4, accumulation=2) == 2 and devices_for(1, accumulation=8) == 1
    assert devices_for("auto", accumulation=4) == 1  # no GPU here


def _trained(root, devices: int, said: list[str]) -> tuple[dict, dict]:
    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2},
                         joint={"steps": 3, "devices": devices}, train={"gradient_accumulation": 2})
    catalog = ingested_catalog(root)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    row = train_joint(context(catalog, config, said.append))
    return row, load_file(catalog.blob_path(row["file"]))


def test_two_ranks_train_the_joint_model_one_process_trains(tmp_path):
    said: list[str] = []
    alone, alone_weights = _trained(tmp_path / "one", 1, said)
    split, split_weights = _trained(tmp_path / "two", 2, said)
    assert any("2 ranks, 2 micro-batches a step" in line for line in said)
    assert any(line.startswith("train 3/3 steps") for line in said)  # the leader's progress reached the task
    assert split["model_id"] == alone["model_id"]  # how many GPUs trained it is not part of the model
    assert split_weights.keys() == alone_weights.keys() and alone_weights
    for name, tensor in alone_weights.items():
        assert (split_weights[name] - tensor).abs().max() <= 1e-6, name
    assert abs(split["final_loss"] - alone["final_loss"]) <= 1e-6
