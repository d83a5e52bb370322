"""Prodigy, the SFO paper's optimizer: it finds its own step size from d0 = 1e-6, resumes
exactly through the loop's checkpoints, and the config says how to set its learning rates."""

import pytest
import torch

from subjectflow.config import TrainConfig, load_config
from subjectflow.training.loop import train
from subjectflow.training.prodigy import Prodigy
from tests.training.test_loop_and_adapters import Quadratic


def test_from_a_tiny_initial_step_it_grows_its_own_and_reaches_the_minimum():
    target = torch.tensor([3.0, -5.0, 8.0])
    x = torch.nn.Parameter(torch.zeros(3))
    optimizer = Prodigy([x])
    first = None
    for _ in range(300):
        loss = ((x - target) ** 2).sum()
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["d"] > 1e-2  # 10^4 times d0: the step size was estimated
    assert ((x - target) ** 2).sum().item() < 1e-3 * first


def test_a_prodigy_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one(tmp_path):
    config = TrainConfig(steps=8, checkpoint_every=3, optimizer="prodigy")
    straight, resumed = Quadratic(), Quadratic()
    train(straight, config, tmp_path / "a", 8, 1.0)
    train(resumed, config, tmp_path / "b", 8, 1.0, stop_after=3)
    again = Quadratic()
    train(again, config, tmp_path / "b", 8, 1.0)  # reloads d, the moments and x0 (weights_only)
    assert torch.equal(straight.w, again.w) and not torch.equal(straight.w, torch.zeros(2))


def test_prodigy_with_an_adamw_sized_learning_rate_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match=r"set train\.learning_rate \(0\.0001\), sfo\.learning_rate \(0\.0001\)"):
        load_config(overrides={"train": {"optimizer": "prodigy"}})
    ones = {"learning_rate": 1.0}
    config = load_config(overrides={"train": {"optimizer": "prodigy", **ones}, "sfo": ones, "joint": ones,
                                    "oneactor": ones, "detex": {**ones, "kv_learning_rate": 1.0},
                                    "concepts": {**ones, "kv_learning_rate": 1.0}})
    assert config.train.optimizer == "prodigy"
