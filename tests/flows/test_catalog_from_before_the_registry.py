"""Ids did not change when the methods moved behind the registry: a catalog built by the
code before the move (its library, run in a subprocess) is current for today's refresh."""

import json
import os
import subprocess
import sys

import pytest

from flows.refresh import catalog_refresh
from subjectflow.catalog import Catalog
from tests.conftest import REPO_ROOT
from tests.flows.test_refresh_flow import REFRESH
from tests.photos import photo_set
from tests.training.conftest import TINY, tiny_config

BEFORE = "951914a"  # main before `subjectflow.methods.registry`
# Settings added since, at the values that behave as that code did (`config.added`), and
# defaults changed since, at that code's default.
SINCE = {"train": {"max_grad_norm": 0.0}, "sfo": {"batch_size": None}, "sft": {"class_images": 8},
         "joint": {"known_references": False, "caption_dropout": 0.0, "reference_dropout": 0.0,
                   "references": "noised"},
         "jointsets": {"augment": {"flip": True, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}}}

# What that release's refresh did, stage by stage, without Prefect: ingest, joint sets,
# SFT + SFO per subject, the joint model, then every evaluation its plan listed.
BUILD = """
import json, sys
from pathlib import Path
from subjectflow.catalog import init_catalog
from subjectflow.catalog.layout import MODELS_DIR
from subjectflow.config import load_config
from subjectflow.evaluation.evaluate import evaluate, plan_evaluations
from subjectflow.evaluation.metrics import ingest_masker
from subjectflow.evaluation.scorers import load_scorers
from subjectflow.ingest import list_source, plan_ingest, process_photos, record_ingest
from subjectflow.jointsets import build_jointsets
from subjectflow.tuning.joint import train_joint
from subjectflow.tuning.runs import load_subjects, open_model, tune_subject

import subjectflow
root, source, overrides = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
assert Path(sys.argv[4]) in Path(subjectflow.__file__).parents, f"imported {subjectflow.__file__}"
config = load_config(overrides=overrides)
catalog = init_catalog(root, config)
listing = list_source(source)
plan = plan_ingest(listing, catalog, config.ingest.settings_hash())
record_ingest(catalog, listing, plan, list(process_photos(plan.todo, catalog.root, config.ingest)),
              config.ingest.settings_hash())
build_jointsets(catalog, config.jointsets)
parts, base = open_model(catalog, config)
for subject in load_subjects(catalog):
    tune_subject(catalog, subject.name, "sfo", config, parts, base)
train_joint(catalog, config, parts, base)
scorers = load_scorers(config.evaluate, device=parts.unet.device, models_dir=catalog.root / MODELS_DIR)
jobs = plan_evaluations(catalog, config, base).todo
for job in jobs:  # each on a fresh model, as that release's evaluate task loaded one
    parts, base = open_model(catalog, config)
    evaluate(catalog, config, parts, base, job, scorers, ingest_masker(config.ingest.mask))
print(json.dumps(sorted(f"{job.subject.name}/{job.method}" for job in jobs)))
"""


def _old_tree(tmp_path):
    tree = tmp_path / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", BEFORE, "subjectflow"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"needs the git history of commit {BEFORE} (a full clone): {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def test_a_catalog_built_before_the_registry_is_current_after_it(tmp_path):
    tree = _old_tree(tmp_path)
    overrides = {**{k: dict(v) for k, v in TINY.items()}, **REFRESH,
                 "evaluate": {"prompts": 1, "images_per_prompt": 2}}
    source = photo_set(tmp_path / "src", subjects=("red_mug",), per_subject=2)
    built = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path / "catalog"), str(source), json.dumps(overrides), str(tree)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    evaluated = json.loads(built.stdout.strip().splitlines()[-1])
    assert evaluated == ["red_mug/jedi", "red_mug/sfo", "red_mug/sft"]

    catalog = Catalog.open(tmp_path / "catalog")
    tables = {name: catalog.read(name).num_rows for name in ("adapters", "models", "negatives", "metrics", "samples")}
    today = {section: {**overrides.get(section, {}), **values} for section, values in SINCE.items()}
    run = catalog_refresh(str(catalog.root), str(source), tiny_config(**{**overrides, **today}), str(tmp_path / "site"))
    assert run.record.status == "completed", run.summary()
    assert run.record.ran == [], run.summary()
    assert {name: catalog.read(name).num_rows for name in tables} == tables
