"""`subjectflow benchmark dreambench`: the protocol's prompt lists, its table, and a run on
a small slice of the real DreamBench photo sets."""

import json
import shutil
from types import SimpleNamespace

import pytest
import yaml

from flows.cli import main
from subjectflow.catalog import init_catalog
from subjectflow.evaluation.dreambench import OBJECT_PROMPTS, method_table, read_prompt_file
from subjectflow.evaluation.evaluate import prompt_set
from tests.training.conftest import tiny_config


def test_both_dreambench_prompt_lists_are_read_and_a_dog_gets_the_live_one(dreambench):
    lists = read_prompt_file(dreambench / "prompts_and_classes.txt")
    kind, objects = lists.for_class("teapot")
    assert kind == "object" and objects == OBJECT_PROMPTS  # the built-in copy for folders without the file
    assert len(objects) == 25 and objects[0] == "a {subject} in the jungle" and objects[-1] == "a cube shaped {subject}"
    kind, live = lists.for_class("dog")
    assert kind == "live" and len(live) == 25 and "a {subject} wearing a santa hat" in live
    assert "a {subject} wearing a santa hat" not in objects

    config = tiny_config(evaluate={"prompt_file": str(dreambench / "prompts_and_classes.txt"), "prompts": 25})
    dog, can = (prompt_set(config, SimpleNamespace(class_name=c)) for c in ("dog", "can"))
    assert dog.prompts == live and can.prompts == objects and dog.name != can.name


def _row(method, metric, value, n, subject="a", kind="random-test", base="tiny@1", scorer="dino@x"):
    return {"method": method, "metric": metric, "value": value, "n_images": n, "subject_id": subject,
            "scorer_kind": kind, "base_model": base, "scorer": scorer}


def test_the_method_table_weights_by_scored_images_and_shows_empty_masks():
    rows = [_row("sfo", "dino", 0.5, 4, "a"), _row("sfo", "dino", 0.8, 4, "b", kind="pretrained"),
            _row("sfo", "mdino", 0.2, 1, "a"), _row("sfo", "mdino", 0.6, 3, "b")]
    table = method_table(rows)
    last = table.splitlines()[-1]
    assert "|  0.650 |" in last  # DINO: (0.5·4 + 0.8·4) / 8
    assert "|  0.500 |" in last  # MDINO by scored images, (0.2 + 0.6·3) / 4, not the mean of subjects (0.4)
    assert "50%" in last and "random-test" in last  # 4 of 8 generated images had an empty mask


@pytest.mark.parametrize("field,value", [("base_model", "sd15@2"), ("scorer", "dino@y"), ("masker", "sam:make")])
def test_a_table_refuses_to_mix_base_models_scorers_or_maskers(field, value):
    rows = [{**_row("sfo", "mdino", 0.5, 4, "a"), "masker": "grabcut"},
            {**_row("sfo", "mdino", 0.8, 4, "b"), "masker": "grabcut", field: value}]
    with pytest.raises(ValueError, match="mix"):
        method_table(rows)


def _slice(dreambench, folder, subjects):
    for subject in subjects:  # two photos each: the protocol, small
        (folder / subject).mkdir(parents=True)
        for photo in sorted((dreambench / subject).glob("*.jpg"))[:2]:
            shutil.copy(photo, folder / subject / photo.name)
    return folder


def test_a_quick_benchmark_is_labelled_a_subset_pins_the_protocol_and_trains_shared_models_elsewhere(
        dreambench, tmp_path, capfd):
    data = _slice(dreambench, tmp_path / "dreambench", ("teapot", "can"))
    shutil.copy(dreambench / "prompts_and_classes.txt", data)
    train_data = _slice(dreambench, tmp_path / "other", ("clock",))
    config = tiny_config(evaluate={"prompts": 2, "images_per_prompt": 2}, versioning={"push": False},
                         jointsets={"resolution": 32, "sets_per_subject": 1}, joint={"steps": 2})
    catalog = init_catalog(tmp_path / "catalog", config)  # params.yaml's evaluation settings do not count
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))

    assert main(["benchmark", "dreambench", "--data", str(data), "--method", "sft", "--method", "jedi", "--quick",
                 "--train-data", str(train_data), "--catalog", str(catalog.root)]) == 0
    out = capfd.readouterr().out
    subjects = {r["subject_id"]: r["name"] for r in catalog.read("subjects").to_pylist()}
    assert {subjects[a["subject_id"]] for a in catalog.read("adapters").to_pylist()} == {"teapot", "can"}
    trained = json.loads(catalog.read("models").to_pylist()[0]["params"])["joint"]["holdout"]
    assert sorted(trained) == ["can", "teapot"]  # the joint model never saw the benchmark's subjects
    jedi = [m for m in catalog.read("metrics").to_pylist() if m["method"] == "jedi"]
    assert jedi and {m["split"] for m in jedi} == {"heldout"} and "in-catalog" not in out
    assert "clock" not in {subjects[m["subject_id"]] for m in catalog.read("metrics").to_pylist()}
    assert "DreamBench-subset: 5 of 25 prompts x 1 of 4 images" in out and "\nDreamBench:" not in out
    header, rule, row = out.split("| method")[1].splitlines()[:3]
    assert all(title in header for title in ("DINO", "CLIP-I", "CLIP-T", "MDINO (grabcut)", "empty masks"))
    assert len("| method" + header) == len(rule)  # the rule lines up with the header
    assert row.startswith("| jedi") and "random-test" in row and "|        2 |" in row
    metrics = catalog.read("metrics").to_pylist()
    assert {(m["protocol"], m["prompt_count"], m["images_per_prompt"]) for m in metrics} == {("DreamBench-subset", 5, 1)}
    assert {m["prompt_set"].split("@")[0] for m in metrics} == {"prompts_and_classes.txt:object"}
    per_prompt = catalog.read("prompt_metrics").to_pylist()
    dino = [p for p in per_prompt if p["metric"] == "dino"]
    assert len(dino) == 2 * 2 * 5  # two subjects, two methods, five prompts and {p["prompt"] for p in dino} == set(OBJECT_PROMPTS[:5])


def test_the_protocol_overrides_params_and_a_folder_without_the_prompts_file_gets_the_object_list(tmp_path, capsys):
    from flows.benchmark import protocol_config
    from subjectflow.evaluation.dreambench import BUILTIN_OBJECT_PROMPTS, Protocol

    config = protocol_config(tmp_path, tiny_config(evaluate={"prompts": 2}, joint={"max_references": 3}),
                             ["sft"], Protocol())
    assert "has no prompts_and_classes.txt" in capsys.readouterr().out
    assert (config.evaluate.prompts, config.evaluate.images_per_prompt, config.joint.max_references) == (25, 4, 1)
    assert config.evaluate.prompt_file == BUILTIN_OBJECT_PROMPTS and config.evaluate.protocol == "DreamBench"
    assert prompt_set(config, SimpleNamespace(class_name="dog")).prompts == OBJECT_PROMPTS
