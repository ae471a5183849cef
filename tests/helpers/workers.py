"""The worker as RunPod starts it: ``handler.py --rp_serve_api`` (the SDK's local API) and
``handler.py --test_input`` (one job, no API), each a real process of its own."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from wan_worker.infra.local_s3 import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def stop(proc: subprocess.Popen) -> None:
    """Kill the process group at once (SeaweedFS takes >10 s on SIGTERM)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def worker_env(tiny_models: Path, **extra: str) -> dict[str, str]:
    """The tiny profile's environment, without any bucket, callback or RunPod variable of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "CALLBACK_", "RUNPOD_"))}
    env.update(
        MODEL_PROFILE="tiny",
        TINY_MODELS_DIR=str(tiny_models),
        ALLOW_PRIVATE_REFERENCE_URLS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def _printed_result(logs: str) -> dict:
    """The job's output as the SDK prints it (a Python literal) after ``--test_input``."""
    for marker in ("Job result:", "run_job return:"):
        lines = [line for line in logs.splitlines() if marker in line]
        if lines:  # the last one printed
            printed = ast.literal_eval(lines[-1].split(marker, 1)[1].strip())
            if output := printed.get("output", printed):
                return output
    return {}


def run_test_input(job_input: dict[str, Any], env: dict[str, str], timeout: float = 240) -> tuple[int, dict, str]:
    """``python handler.py --test_input``: (exit code, the job's output dict, all logs).

    This entry point has no API, so the output is read from what the SDK prints."""
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": job_input})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    logs = proc.stdout + proc.stderr
    return proc.returncode, _printed_result(logs), logs


@dataclass
class ApiWorker:
    """A running ``handler.py --rp_serve_api``; results are read from its HTTP API."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def runsync(self, job_input: Any, timeout: float = 240) -> dict:
        response = requests.post(f"{self.url}/runsync", json={"input": job_input}, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_api_worker(env: dict[str, str], log_path: Path) -> ApiWorker:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_port(port, 90, proc)
    return ApiWorker(f"http://127.0.0.1:{port}", proc, log_path)
