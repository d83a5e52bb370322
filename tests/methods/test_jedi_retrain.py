"""joint.retrain: a small change keeps the joint model (JeDi serves a new subject by set
completion without training on it) and the new subject is scored as held out."""

from subjectflow.config import JointConfig
from subjectflow.evaluation.evaluate import plan_evaluations
from subjectflow.jointsets import build_jointsets
from subjectflow.methods import registry
from subjectflow.methods.jedi.model import train_joint
from subjectflow.methods.jedi.retrain import retrain_due
from tests.ingest.helpers import ingest
from tests.photos import photo_set
from tests.training.conftest import context, ingested_catalog, tiny_config


def test_the_policy_keeps_a_model_for_a_small_change_and_retrains_past_its_fraction_or_schedule():
    trained = {f"set{i}": f"s{i // 2}" for i in range(20)}
    one_more = {**trained, "new": "s99"}  # 1 of 21 sets changed
    many = {**dict(list(trained.items())[3:]), "n1": "x", "n2": "y"}  # 5 of 22
    policy = JointConfig()
    assert policy.retrain == "fraction" and retrain_due(policy, trained, dict(trained), 0) is None
    assert retrain_due(policy, trained, one_more, 0) is None
    assert "23% of the joint sets changed" in retrain_due(policy, trained, many, 0)
    assert "1 joint set(s) changed" in retrain_due(policy.model_copy(update={"retrain": "any"}), trained, one_more, 0)
    schedule = policy.model_copy(update={"retrain": "schedule"})
    assert retrain_due(schedule, trained, many, 6.9) is None
    assert "7.0 days old" in retrain_due(schedule, trained, many, 7.0)


def test_a_new_subject_is_served_by_the_kept_joint_model_and_scored_as_held_out(tmp_path):
    joint = {"steps": 2, "retrain_fraction": 0.6}
    config = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2}, joint=joint)
    catalog = ingested_catalog(tmp_path)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    model = train_joint(context(catalog, config))
    assert '"retrain": "fraction"' in model["params"]

    # a third subject arrives: 2 of 6 sets are new, under the 60% that would retrain
    ingest(photo_set(tmp_path / "src", subjects=("red_mug", "blue_box", "vase")), catalog, config.ingest)
    build_jointsets(catalog, config.jointsets, say=lambda _: None)
    ctx = context(catalog, config)
    found, _ = registry.current(ctx, "jedi", None)
    assert found["jedi"]["model_id"] == model["model_id"]
    plan = plan_evaluations(ctx, methods=["jedi"])
    assert {(job.subject.name, job.split) for job in plan.todo} == {
        ("red_mug", "in-catalog"), ("blue_box", "in-catalog"), ("vase", "heldout")}
    assert plan.todo[0].subject.name == "vase"  # the held-out subject is scored first

    # retraining on any change: the same catalog wants a new model
    eager = tiny_config(jointsets={"resolution": 32, "sets_per_subject": 2}, joint={**joint, "retrain": "any"})
    found, why = registry.current(context(catalog, eager), "jedi", None)
    assert not found and "subjectflow tune --method jedi" in why
