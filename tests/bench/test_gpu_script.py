"""bench/gpu.sh stays runnable on machines without a GPU: its dry run goes through every
bench it calls, at tiny sizes on the CPU, and prints the summary against the peak."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_gpu_script_dry_run_runs_every_bench_and_summarises(tmp_path):
    done = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=900, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    for bench in ("tune", "joint", "oneactor", "tokens", "flux"):
        assert json.loads((tmp_path / bench / "results.json").read_text())
    assert json.loads((tmp_path / "peak.json").read_text())["tflop_per_s"] > 0
    summary = done.stdout[done.stdout.index("matmul peak"):]
    assert "pipeline SFO" in summary and "of peak" in summary and "oneactor: to train" in summary
    assert "detex training steps/s: SFT" in summary
    assert "concepts training steps/s" in summary and "E-step" in summary
    assert "tiny-flux training" in summary and "ckpt SFO" in summary  # bench/families.py, via tune.py
