"""`subjectflow benchmark dreambench` on a small slice of the real DreamBench photo sets."""

import shutil

import yaml

from flows.cli import main
from subjectflow.catalog import init_catalog
from subjectflow.evaluation.dreambench import method_table, read_prompt_file
from tests.training.conftest import tiny_config


def test_dreambench_prompts_are_read_from_its_own_file(dreambench):
    templates = read_prompt_file(dreambench / "prompts_and_classes.txt")
    assert len(templates) == 25 and templates[0] == "a {subject} in the jungle"
    assert templates[-1] == "a cube shaped {subject}"


def test_the_method_table_averages_subjects_and_flags_non_pretrained_scorers():
    rows = [{"method": "sfo", "metric": "dino", "value": v, "subject_id": s, "scorer_kind": k}
            for v, s, k in ((0.5, "a", "pretrained"), (0.7, "b", "random-test"))]
    table = method_table(rows)
    assert "|  0.600 |" in table and "random-test" in table.splitlines()[-1]


def test_benchmark_dreambench_prints_the_papers_table(dreambench, tmp_path, capfd):
    data = tmp_path / "dreambench"
    for subject in ("teapot", "can"):  # two subjects, two photos each: the protocol, small
        (data / subject).mkdir(parents=True)
        for photo in sorted((dreambench / subject).glob("*.jpg"))[:2]:
            shutil.copy(photo, data / subject / photo.name)
    shutil.copy(dreambench / "prompts_and_classes.txt", data)
    config = tiny_config(evaluate={"prompts": 2, "images_per_prompt": 2}, joint={"enabled": False},
                         versioning={"push": False})
    catalog = init_catalog(tmp_path / "catalog", config)
    (catalog.root / "params.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))

    assert main(["benchmark", "dreambench", "--data", str(data), "--method", "sft",
                 "--catalog", str(catalog.root)]) == 0
    out = capfd.readouterr().out
    header, _, row = out.split("| method")[1].splitlines()[:3]
    assert "DINO" in header and "CLIP-I" in header and "CLIP-T" in header and "MDINO" in header
    assert row.startswith("| sft") and "random-test" in row and "|        2 |" in row
    metrics = catalog.read("metrics").to_pylist()
    assert {m["prompt_set"].split("@")[0] for m in metrics} == {"prompts_and_classes.txt"}
