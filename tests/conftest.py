"""Shared fixtures: one Prefect test harness per session, a real S3 endpoint (moto's
ThreadedMotoServer on 127.0.0.1), temporary catalogs, and the shared DreamBench photos."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(os.environ.get("SUBJECTFLOW_DREAMBENCH", REPO_ROOT.parent / "shared" / "datasets" / "dreambench-dev"))

# Offline machine: never let a library try to phone home during tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a 2-core machine torch's OpenMP
    threads competing with any other process (an ingest worker, a server) make each
    UNet call up to ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import SERVER_STARTUP_S, without_heartbeats

    # As generous as the CLI: other jobs on the machine may keep every core busy.
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", SERVER_STARTUP_S))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(prefect_test_harness(server_startup_timeout=timeout))
        except RuntimeError:
            pytest.exit(f"Prefect's test server did not answer within {timeout} s; set "
                        f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher and rerun", returncode=2)
        stack.enter_context(without_heartbeats())  # the harness's server is as temporary as the CLI's
        yield


@pytest.fixture(autouse=True)
def prefect_console_follows_capture():
    """Prefect's console handler keeps the stderr it saw at set-up, which pytest swaps
    (and closes) per test; point it at the current test's stream instead."""
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.stderr  # not setStream(): it flushes the closed one
                handler.console.file = sys.stderr
    yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint; boto3 and DVC's s3fs both reach it via AWS_ENDPOINT_URL."""
    from bench.local_s3 import local_s3

    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def catalog(tmp_path):
    """A fresh standalone catalog (its own git + DVC repo) with default config."""
    from subjectflow.catalog import init_catalog
    from subjectflow.config import Config

    return init_catalog(tmp_path / "catalog", Config())


@pytest.fixture
def dreambench() -> Path:
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench photo sets not found at {DREAMBENCH} (set SUBJECTFLOW_DREAMBENCH); "
                    "they live in the team's shared/ folder, not in this repository")
    return DREAMBENCH
