"""`dvc repro` reproduces the flows' work from dvc.yaml + params.yaml."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import yaml

from subjectflow.catalog import init_catalog
from subjectflow.catalog.layout import render_dvc_stages
from subjectflow.config import Config
from tests.photos import photo_set


def test_dvc_repro_runs_the_ingest_stage_into_the_projects_catalog(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = lambda *args: subprocess.run(args, cwd=project, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    params = Config().model_dump()
    params["ingest"].update(source="photos", resolution=64, workers=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": render_dvc_stages("catalog")}))
    photo_set(project / "photos")
    init_catalog(project / "catalog", Config())

    run(sys.executable, "-m", "dvc", "repro", "-q", "ingest")

    assert ds.dataset(project / "catalog" / "tables" / "images").to_table().num_rows == 6
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ingest"]
    assert lock["params"]["params.yaml"]["ingest"]["resolution"] == 64
    declared = {next(iter(out)) for out in render_dvc_stages("catalog")["ingest"]["outs"]}
    assert {out["path"] for out in lock["outs"]} == declared
