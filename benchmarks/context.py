"""What the sections share: the arguments, the scratch and model folders, the job shape, the
JSON document so far, and what one section leaves for a later one (the reference frames, the
worker's decoded frames, the warm ``Worker``, the S3 server)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import T2V_REPO, TURBO_REPO, now, r
from .jobs import bench_job, turbo_job

#: The repository root: the child processes run ``python -m benchmarks`` with it on PYTHONPATH.
ROOT = Path(__file__).resolve().parent.parent


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.out_path = Path(args.out) if args.out else None
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="wan-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(args.models_dir) if args.models_dir else self.work / "models"
        self.tiny_dir = Path(args.tiny_models_dir) if args.tiny_models_dir else self.models_dir / "tiny"
        if self.tiny:
            self.height, self.width, self.frames, self.steps = 256, 256, 9, 2
        else:
            self.height, self.width, self.frames, self.steps = args.height, args.width, args.frames, args.steps
        self.guidance = 6.5  # video_fast's preset
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
            "mode": "tiny" if self.tiny else "full",
            "shape": {
                "frames": self.frames,
                "height": self.height,
                "width": self.width,
                "steps": self.steps,
                "guidance_scale": self.guidance,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sections": {},
        }
        self.frames_ref: np.ndarray | None = None
        self.frames_worker: np.ndarray | None = None
        self.s3 = None  # wan_worker.infra.local_s3.S3Server once the s3_server section started one
        self.worker = None  # the warm wan_worker.serving.worker.Worker, shared by the sections that allow it
        self.worker_origin = "the worker section's (warm)"  # what the sections reusing it record

    @property
    def sections(self) -> dict[str, Any]:
        """The results of the sections that ran so far."""
        return self.result["sections"]

    def save(self) -> None:
        """Rewrite the JSON document, so an interrupted run still leaves what it measured."""
        if self.out_path:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            tmp.replace(self.out_path)

    def settings(self, **overrides):
        """The worker's ``Settings`` for this run (profile, folders, S3 or inline assets)."""
        from wan_worker.contract.settings import Settings

        base: dict[str, Any] = dict(
            models_dir=self.models_dir, work_dir=self.work, log_level="WARNING", job_timeout_s=3600
        )
        if self.tiny:
            base.update(model_profile="tiny", tiny_models_dir=self.tiny_dir)
        if self.s3 is not None:
            base.update(self.s3.settings())
        else:
            base.update(inline_max_bytes=1 << 30)  # no S3: assets come back inline
        base.update(overrides)
        return Settings(**base)

    def job(self, **extra) -> dict[str, Any]:
        """The benchmark's ``video_fast`` job at the run's shape."""
        return bench_job(self.width, self.height, self.frames, self.steps, **extra)

    def turbo_job(self, kind: str, **extra) -> dict[str, Any]:
        """A ``quality: "turbo"`` video or image job at the run's shape."""
        return turbo_job(self.width, self.height, self.frames, kind, **extra)

    def t2v_dir(self) -> Path:
        if self.tiny:
            from wan_worker.runtime.tiny import T2V_DIR

            return self.tiny_dir / T2V_DIR
        return self.models_dir / Path(T2V_REPO).name

    def turbo_written(self) -> bool:
        """Whether the turbo checkpoint is among the written models."""
        if self.tiny:
            from wan_worker.runtime.tiny import TURBO_DIR

            return (self.tiny_dir / TURBO_DIR / ".complete").exists()
        return (self.models_dir / Path(TURBO_REPO).name / ".complete").exists()

    def new_worker(self, **overrides) -> tuple[Any, dict[str, Any]]:
        """A new worker with its models loaded and the job shape compiled, as WARMUP_ON_START does."""
        from wan_worker.serving.worker import Worker

        started = now()
        worker = Worker(self.settings(**overrides))
        worker.manager.encoder_pipe()
        info: dict[str, Any] = {"worker": "new", "load_s": r(now() - started, 2)}
        t = now()
        worker.manager.warm_up(self.width, self.height, self.frames)
        info["warm_compile_s"] = r(now() - t, 2)
        return worker, info

    def warm_worker(self, **overrides) -> tuple[Any, dict[str, Any]]:
        """The shared warm worker when there is one and no override asks for another, else a new
        one (kept as the shared one when it has the default settings)."""
        if not overrides and self.worker is not None:
            return self.worker, {"worker": self.worker_origin}
        worker, info = self.new_worker(**overrides)
        if not overrides:
            self.worker, self.worker_origin = worker, "an earlier section's (warm)"
        return worker, info

    def child_env(self, settings) -> dict[str, str]:
        """This process' environment with ``settings`` as the worker's variables, and the
        repository root and the imported ``wan_worker`` on PYTHONPATH."""
        import wan_worker

        env = dict(os.environ)
        for key, value in settings.model_dump().items():
            if value is None or key in ("hf_token", "runpod_ai_api_key"):
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[key.upper()] = str(value)
        package_root = str(Path(next(iter(wan_worker.__path__))).resolve().parent)
        paths = dict.fromkeys([str(ROOT), package_root, *env.get("PYTHONPATH", "").split(os.pathsep)])
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
        return env

    def run_child(
        self, child: str, extra: list[str], env: dict[str, str], timeout: float, *, must_succeed: bool = True
    ) -> dict[str, Any]:
        """``python -m benchmarks --child <child>`` in a fresh process (fresh CUDA context, clean
        memory statistics): the last JSON line it printed, or why there is none. With
        ``must_succeed`` a non-zero exit is an error even after a JSON line."""
        cmd = [sys.executable, "-m", "benchmarks", "--child", child, *extra]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines or (must_succeed and proc.returncode != 0):
            return {"error": f"child exited {proc.returncode}", "stderr": proc.stderr[-4000:]}
        out = json.loads(lines[-1])
        if not must_succeed:
            out["child_exit"] = proc.returncode
        return out
