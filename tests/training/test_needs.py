"""A method that needs another's artefact says which one it starts from, and when the
catalog holds one for other settings, what differs and how to use it instead."""

from subjectflow.methods import registry
from tests.training.conftest import context, tiny_config


def test_a_need_made_with_other_settings_is_named_with_what_differs_and_how_to_keep_it(two_subjects):
    registry.tune(context(two_subjects, tiny_config(train={"steps": 3})), "sft", "red_mug")
    said = []
    registry.tune(context(two_subjects, tiny_config(), said.append), "sfo", "red_mug")
    first = next(line for line in said if "sfo starts from the sft adapter" in line)
    assert "train.steps 3 there, 6 now" in first and "`--set train.steps=3` uses it" in first

    said.clear()
    registry.negatives(context(two_subjects, tiny_config(), said.append), "sfo", "red_mug")
    assert any(line.startswith("red_mug: negatives starts from sft adapter") and " ago" in line for line in said)
