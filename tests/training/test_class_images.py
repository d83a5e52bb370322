"""Prior-preservation class images: sampled once per class and settings, kept in the
catalog one row per image, and grown (not re-made) when the count goes up."""

import torch

from subjectflow.methods.base import Context
from subjectflow.methods.sft import METHOD as SFT
from subjectflow.methods.sft import train_sft
from subjectflow.training.class_images import STEPS, class_image_latents
from subjectflow.training.subjects import load_subject
from tests.training.conftest import context, tiny_config


def prior(count):
    return tiny_config(sft={"prior_preservation": True, "class_images": count}, train={"steps": 1})


def test_class_images_are_made_once_and_a_larger_count_adds_only_the_new_ones(two_subjects):
    ctx = context(two_subjects, prior(2))
    class_name = load_subject(two_subjects, "red_mug").class_name
    first = class_image_latents(ctx, class_name)
    rows = two_subjects.read("class_images").to_pylist()
    assert first.shape[0] == 2 and sorted(r["index"] for r in rows) == [0, 1]
    assert all(f'"steps": {STEPS}' in r["params"] and r["class_prompt"].endswith(class_name) for r in rows)

    grown = context(two_subjects, prior(3))
    more = class_image_latents(grown, class_name)
    assert grown.made == [f"1 {class_name} class images"] and grown.reused == [f"2 {class_name} class images"]
    assert two_subjects.read("class_images").num_rows == 3
    assert torch.equal(more[:2], first)  # image i is the same at any count

    again = context(two_subjects, prior(3))
    class_image_latents(again, class_name)
    assert again.made == [] and two_subjects.read("class_images").num_rows == 3


def test_an_sft_adapter_with_prior_preservation_is_identified_by_its_class_images(two_subjects):
    subject = load_subject(two_subjects, "blue_box")
    ids = {n: SFT.artefact_id(Context.open(two_subjects, prior(n)), subject, {}) for n in (2, 3)}
    assert ids[2] != ids[3]
    assert SFT.artefact_id(Context.open(two_subjects, tiny_config(sft={"class_images": 2})), subject, {}) != ids[2]

    row = train_sft(context(two_subjects, prior(2)), subject)
    assert row["adapter_id"] == ids[2] and two_subjects.read("class_images").num_rows == 2
