"""No test-set leakage: models shared across subjects never train on held-out subjects, and a
score on a subject the shared model did train on is labelled in-catalog, never zero-shot."""

from subjectflow.evaluation.dreambench import method_table
from subjectflow.evaluation.evaluate import plan_evaluations
from subjectflow.jointsets import build_jointsets
from subjectflow.methods import registry
from subjectflow.methods.jedi.model import current_sets, train_joint
from subjectflow.training.subjects import Subject, is_heldout
from tests.training.conftest import context, ingested_catalog, tiny_config


def _subjects(n):
    return [Subject(f"id{i}", f"s{i}", "mug", ()) for i in range(n)]


def test_a_held_out_fraction_is_drawn_per_subject_and_never_moves_when_others_are_added():
    first = {s.subject_id for s in _subjects(200) if is_heldout(s, 0.25, seed=0)}
    more = {s.subject_id for s in _subjects(400) if is_heldout(s, 0.25, seed=0)}
    assert first == {i for i in more if int(i[2:]) < 200}  # the first 200 keep their split
    assert 0.18 < len(more) / 400 < 0.32
    assert {s.subject_id for s in _subjects(200) if is_heldout(s, 0.25, seed=1)} != first
    assert is_heldout(_subjects(1)[0], ("s0",), 0) and not is_heldout(_subjects(1)[0], ("other",), 0)


def test_the_joint_model_skips_held_out_subjects_and_their_scores_are_labelled(tmp_path):
    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2}, joint={"steps": 2, "holdout": ["blue_box"]})
    catalog = ingested_catalog(tmp_path)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    ctx = context(catalog, config)
    trained_on = {r["subject_id"] for r in current_sets(catalog, config)}
    assert trained_on == {s["subject_id"] for s in catalog.read("subjects").to_pylist() if s["name"] == "red_mug"}
    model = train_joint(ctx)
    assert '"holdout": ["blue_box"]' in model["params"]
    assert registry.get("jedi").trained_on(ctx) == trained_on

    plan = plan_evaluations(ctx, methods=["jedi"])
    assert {(job.subject.name, job.split) for job in plan.todo} == {("red_mug", "in-catalog"), ("blue_box", "heldout")}


def test_in_catalog_scores_get_their_own_row_in_the_table():
    row = {"method": "jedi", "metric": "dino", "n_images": 4, "scorer_kind": "pretrained", "base_model": "b",
           "scorer": "dino@1", "masker": "grabcut"}
    table = method_table([{**row, "value": 0.4, "subject_id": "a", "split": "heldout"},
                          {**row, "value": 0.9, "subject_id": "b", "split": "in-catalog"}])
    lines = table.splitlines()
    assert any(line.startswith("| jedi ") and "0.400" in line for line in lines)
    assert any(line.startswith("| jedi (in-catalog)") and "0.900" in line for line in lines)
