"""Commands hold on a machine whose every core other torch jobs keep busy, and a Prefect
server that cannot start is one line of advice, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

from subjectflow.catalog import init_catalog
from tests.photos import photo_set
from tests.training.conftest import tiny_config

SUBJECTFLOW = str(Path(sys.executable).with_name("subjectflow"))
# What a CPU training or evaluation run does to a core, for as long as the test needs.
TORCH_JOB = "import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = (x @ x).tanh()\n"


def _command(tmp_path, *args, **env):
    """A fresh process with its own temporary Prefect server, as a user's shell runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run([SUBJECTFLOW, *args], capture_output=True, text=True, timeout=900,
                          env={**clean, "PREFECT_HOME": str(tmp_path / "prefect"), **env})


def _catalog(tmp_path):
    catalog = init_catalog(tmp_path / "catalog", tiny_config())
    return catalog, photo_set(tmp_path / "src", subjects=("vase",), per_subject=2)


def test_a_command_runs_while_torch_jobs_load_every_core(tmp_path):
    catalog, source = _catalog(tmp_path)
    jobs = [subprocess.Popen([sys.executable, "-c", TORCH_JOB]) for _ in range(os.cpu_count() or 2)]
    try:
        done = _command(tmp_path, "ingest", str(source), "--catalog", str(catalog.root), "--workers", "1")
    finally:
        for job in jobs:
            job.kill()
            job.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    assert catalog.read("images").num_rows == 2
    assert "requires torchvision" not in done.stderr + done.stdout  # no library noise on start


def test_a_server_that_does_not_start_is_one_line_of_advice(tmp_path):
    catalog, source = _catalog(tmp_path)
    done = _command(tmp_path, "ingest", str(source), "--catalog", str(catalog.root),
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("subjectflow: error:")]
    assert len(error) == 1 and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in error[0]
    assert "PREFECT_API_URL" in error[0]
