"""Fault injection: every fault is injected for real, in process.

In each case nothing is lost: either the assets are uploaded and reported, or the job fails
with a clear error that says whether a retry may succeed; and the per-job temp directory
(under ``WORK_DIR``) is gone afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from helpers.faultproxy import FaultProxy
from helpers.inprocess import SMALL_IMAGE, SMALL_VIDEO, handle, png_data_uri, s3_settings, tiny_worker
from helpers.logcapture import CALLBACK_SECRET
from helpers.workers import stop

from wan_worker.infra.local_s3 import BUCKET, free_port, start_s3


@pytest.fixture
def work_dir(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def assert_clean(work_dir: Path) -> None:
    assert list(work_dir.iterdir()) == [], "a per-job temp directory was left behind"


def assert_stored(client, out: dict) -> None:
    (asset,) = out["assets"]
    for key in (asset["path"], asset["thumbnail_path"]):
        assert client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0


def s3_port(server) -> int:
    return int(server.endpoint.rsplit(":", 1)[1])


class RaiseInForward:
    """A forward pre-hook on the T2V transformer raising ``exc`` the first ``times`` calls."""

    def __init__(self, worker, exc: BaseException, times: int = 10**9) -> None:
        self.exc, self.times, self.calls = exc, times, 0
        self.handle = worker.manager.encoder_pipe().transformer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls <= self.times:
            raise self.exc

    def remove(self) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# Object storage


def test_s3_server_killed_mid_job(tiny_models, tmp_path, work_dir):
    """A dedicated SeaweedFS is SIGKILLed when the job reaches its upload stage."""
    server = start_s3(tmp_path / "doomed-s3")
    try:
        worker = tiny_worker(
            tiny_models, **s3_settings(server), work_dir=work_dir, upload_attempts=2, upload_timeout_s=3
        )
        assert handle(worker, {**SMALL_IMAGE, "id": "before-kill"})["status"] == "completed"

        def kill_at_upload(payload: dict) -> None:
            if payload.get("stage") == "uploading":
                stop(server.proc)

        started = time.monotonic()
        out = worker.handle({"id": "rp", "input": {**SMALL_VIDEO, "id": "killed-mid-job"}}, send=kill_at_upload)
        assert server.proc.poll() is not None, "the S3 server was not killed"
        assert time.monotonic() - started < 30
        assert out["error_code"] == "storage_error" and out["retryable"] is True, out
        assert "0.mp4" in out["error"] and "not stored" in out["error"]
        assert "assets" not in out and out["job_id"] == "killed-mid-job"
        assert_clean(work_dir)
        # The worker keeps answering: the next job fails the same clear way, quickly.
        again = handle(worker, {**SMALL_IMAGE, "id": "after-kill"})
        assert again["error_code"] == "storage_error" and again["retryable"] is True
        assert_clean(work_dir)
    finally:
        stop(server.proc)


@pytest.fixture
def proxy(s3):
    proxy = FaultProxy(s3_port(s3))
    yield proxy
    proxy.close()


def test_s3_500_once_is_retried_and_the_assets_are_stored(tiny_models, s3, proxy, work_dir):
    proxy.fail, proxy.methods = 1, {"PUT"}
    worker = tiny_worker(tiny_models, **s3_settings(s3, proxy.endpoint), work_dir=work_dir, upload_attempts=3)
    out = handle(worker, {**SMALL_VIDEO, "id": "s3-500-once"})
    assert out["status"] == "completed", out
    puts = [(path, status) for method, path, status in proxy.log if method == "PUT"]
    assert puts[0] == (f"/{BUCKET}/anonymous/s3-500-once/0.mp4", 500)
    assert puts[1] == (f"/{BUCKET}/anonymous/s3-500-once/0.mp4", 200)
    assert_stored(s3.client(), out)
    # The presigned URL (through the proxy's endpoint) serves the real bytes.
    data = requests.get(out["assets"][0]["url"], timeout=30).content
    assert len(data) == out["assets"][0]["metadata"]["file_size_bytes"]
    assert_clean(work_dir)


def test_s3_always_500_fails_retryable_after_the_configured_attempts(tiny_models, s3, proxy, work_dir):
    proxy.fail, proxy.methods = 10**6, {"PUT"}
    worker = tiny_worker(tiny_models, **s3_settings(s3, proxy.endpoint), work_dir=work_dir, upload_attempts=3)
    out = handle(worker, {**SMALL_IMAGE, "id": "s3-500-always"})
    assert out["error_code"] == "storage_error" and out["retryable"] is True, out
    assert "after 3 attempts" in out["error"] and "assets" not in out
    assert [m for m, _ in proxy.requests].count("PUT") == 3
    assert_clean(work_dir)


def test_slow_s3_times_out_then_the_retry_succeeds(tiny_models, s3, proxy, work_dir):
    proxy.delay_s, proxy.delay_count, proxy.methods = 4.0, 1, {"PUT"}
    worker = tiny_worker(
        tiny_models, **s3_settings(s3, proxy.endpoint), work_dir=work_dir, upload_attempts=3, upload_timeout_s=1.0
    )
    started = time.monotonic()
    out = handle(worker, {**SMALL_IMAGE, "id": "s3-slow"})
    assert out["status"] == "completed", out
    assert time.monotonic() - started < 20
    assert out["metadata"]["timings"]["uploading"] >= 1.0  # the first attempt waited out its timeout
    assert [m for m, _ in proxy.requests].count("PUT") == 3  # image, its retry, thumbnail
    assert_stored(s3.client(), out)
    assert_clean(work_dir)


def test_slow_s3_beyond_every_attempt_fails_retryable(tiny_models, s3, proxy, work_dir):
    proxy.delay_s, proxy.delay_count, proxy.methods = 3.0, 2, {"PUT"}
    worker = tiny_worker(
        tiny_models, **s3_settings(s3, proxy.endpoint), work_dir=work_dir, upload_attempts=2, upload_timeout_s=0.5
    )
    started = time.monotonic()
    out = handle(worker, {**SMALL_IMAGE, "id": "s3-too-slow"})
    assert out["error_code"] == "storage_error" and out["retryable"] is True, out
    assert "Timeout" in out["error"] or "timeout" in out["error"].lower()
    assert time.monotonic() - started < 15
    assert_clean(work_dir)


# --------------------------------------------------------------------------------------------
# References and callbacks


@pytest.fixture
def hanging_host():
    """A TCP server that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/reference.png"
    sock.close()


def test_reference_host_that_hangs_falls_back_in_bounded_time(tiny_models, hanging_host, work_dir):
    worker = tiny_worker(tiny_models, reference_timeout_s=1.0, work_dir=work_dir)
    started = time.monotonic()
    out = handle(worker, {**SMALL_VIDEO, "first_frame": hanging_host})
    assert time.monotonic() - started < 15
    assert out["status"] == "completed"
    assert out["assets"][0]["metadata"]["reference_mode_applied"] == "none"
    assert any("first_frame: timed out" in w and "fell back" in w for w in out["warnings"]), out["warnings"]

    strict = handle(worker, {**SMALL_VIDEO, "first_frame": hanging_host, "strict_references": True})
    assert strict["error_code"] == "reference_unavailable" and strict["field"] == "first_frame"
    assert "timed out" in strict["error"]
    assert_clean(work_dir)


def test_job_timeout_bounds_a_hanging_reference_fetch(tiny_models, hanging_host):
    worker = tiny_worker(tiny_models, reference_timeout_s=30, job_timeout_s=2)
    handle(worker, SMALL_IMAGE)  # load the models first: the deadline is about the job
    started = time.monotonic()
    out = handle(worker, {**SMALL_VIDEO, "first_frame": hanging_host, "strict_references": True})
    assert time.monotonic() - started < 8, "the reference fetch ignored JOB_TIMEOUT_S"
    assert out["error_code"] in ("reference_unavailable", "job_timeout")


def test_callback_receiver_down_loses_nothing(tiny_models, s3, work_dir):
    worker = tiny_worker(
        tiny_models,
        **s3_settings(s3),
        work_dir=work_dir,
        callback_url=f"http://127.0.0.1:{free_port()}/cb",
        callback_secret=CALLBACK_SECRET,
        callback_attempts=2,
        callback_timeout_s=1,
    )
    out = handle(worker, {**SMALL_VIDEO, "id": "cb-down-faults"})
    assert out["status"] == "completed" and out["callback_delivered"] is False
    assert_stored(s3.client(), out)
    assert_clean(work_dir)


# --------------------------------------------------------------------------------------------
# GPU faults


def test_cuda_oom_degrades_quality_once_then_succeeds(tiny_models, work_dir):
    worker = tiny_worker(tiny_models, work_dir=work_dir)
    hook = RaiseInForward(
        worker, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), times=1
    )
    try:
        out = handle(worker, {**SMALL_IMAGE, "quality": "high", "config": {}})
    finally:
        hook.remove()
    assert out["status"] == "completed", out
    assert out["metadata"]["quality"] == "balanced"
    assert out["metadata"]["quality_degraded"] == {"from": "high", "to": "balanced", "reason": "CUDA out of memory"}
    assert any("out of GPU memory" in w for w in out["warnings"])
    assert "refresh_worker" not in out
    assert_clean(work_dir)


def test_cuda_oom_twice_fails_retryable_and_refreshes_the_worker(tiny_models, work_dir):
    from runpod.serverless.modules import rp_job

    worker = tiny_worker(tiny_models, work_dir=work_dir)
    hook = RaiseInForward(worker, torch.cuda.OutOfMemoryError("CUDA out of memory."))
    try:
        out = handle(worker, {**SMALL_IMAGE, "quality": "high"})
        assert out["error_code"] == "out_of_memory" and out["retryable"] is True
        assert out["refresh_worker"] is True
        # Through the SDK's own job runner: the flag becomes stopPod, the job FAILED.
        result = asyncio.run(
            rp_job.run_job(lambda job: worker.handle(job, send=lambda p: None), {"id": "rp-oom", "input": SMALL_IMAGE})
        )
        assert result["stopPod"] is True and "out of GPU memory" in result["error"]
        assert "refresh_worker" not in result["output"]
    finally:
        hook.remove()
    assert handle(worker, SMALL_IMAGE)["status"] == "completed"  # the process itself still works
    assert_clean(work_dir)


def test_other_cuda_errors_refresh_the_worker(tiny_models, work_dir):
    worker = tiny_worker(tiny_models, work_dir=work_dir)
    hook = RaiseInForward(worker, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    try:
        out = handle(worker, SMALL_IMAGE)
    finally:
        hook.remove()
    assert out["error_code"] == "cuda_error" and out["retryable"] is True and out["refresh_worker"] is True, out
    assert "illegal memory access" in out["error"]
    assert_clean(work_dir)


# --------------------------------------------------------------------------------------------
# Models, disk, time


def corrupt_copy(tiny_models: Path, tmp_path: Path, model_dir: str) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(tiny_models, copy)
    weights = copy / model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return copy


def test_corrupt_t2v_weights_give_a_clear_error(tiny_models, tmp_path, work_dir):
    models = corrupt_copy(tiny_models, tmp_path, "Wan2.1-T2V-1.3B-Diffusers")
    worker = tiny_worker(models, work_dir=work_dir)
    for _ in range(2):  # and the worker answers the next job the same clear way
        out = handle(worker, SMALL_IMAGE)
        assert out["error_code"] == "model_unavailable" and out["retryable"] is False, out
        assert "could not load Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in out["error"]
        assert "download_models.py" in out["error"] and out["refresh_worker"] is True
    assert_clean(work_dir)


def test_corrupt_vace_weights_fail_reference_jobs_only(tiny_models, tmp_path, work_dir):
    models = corrupt_copy(tiny_models, tmp_path, "Wan2.1-VACE-1.3B-diffusers")
    worker = tiny_worker(models, work_dir=work_dir)
    out = handle(worker, {**SMALL_VIDEO, "first_frame": png_data_uri()})
    assert out["error_code"] == "model_unavailable" and "VACE" in out["error"], out
    assert handle(worker, SMALL_VIDEO)["status"] == "completed"  # text-to-video still serves
    assert_clean(work_dir)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs: room for a thumbnail, not for the video."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing_the_video(tiny_models, s3, tiny_disk):
    worker = tiny_worker(tiny_models, **s3_settings(s3), work_dir=tiny_disk)
    # Noise-like content compresses badly: 256x256x33 frames needs well over 96 KiB.
    out = handle(worker, {**SMALL_VIDEO, "id": "disk-full", "frame_num": 33, "config": {"num_inference_steps": 1}})
    assert out.get("error_code") == "disk_full" and out["retryable"] is True, out
    assert "WORK_DIR" in out["error"] and "assets" not in out
    assert_clean(tiny_disk)
    ok = handle(worker, {**SMALL_IMAGE, "id": "disk-ok"})  # a small result still fits
    assert ok["status"] == "completed", ok
    assert_clean(tiny_disk)


def test_job_timeout_interrupts_generation_at_the_next_step(tiny_models, work_dir):
    worker = tiny_worker(tiny_models, job_timeout_s=2.0, work_dir=work_dir)
    handle(worker, SMALL_IMAGE)  # models loaded: the timeout is about generation
    decodes: list[int] = []
    hook = worker.manager.encoder_pipe().vae.decoder.register_forward_pre_hook(lambda m, a: decodes.append(1))
    progress: list[dict] = []
    # 480x480x81: a step takes about a second here, the VAE decode of 81 frames ~8 s.
    job = {**SMALL_VIDEO, "width": 480, "height": 480, "frame_num": 81, "config": {"num_inference_steps": 100}}
    started = time.monotonic()
    try:
        out = handle(worker, job, progress=progress)
    finally:
        hook.remove()
    elapsed = time.monotonic() - started
    assert out["error_code"] == "job_timeout" and out["retryable"] is True, out
    assert "JOB_TIMEOUT_S=2" in out["error"]
    steps = [p["step"] for p in progress if "step" in p]
    assert steps and max(steps) < 100, "generation was not interrupted"
    assert decodes == [], "a timed-out job still decoded its half-denoised latents"
    # Bounded: the deadline plus about one step (generous for a busy CI machine).
    assert elapsed < 2.0 + 6.0, f"the job ran {elapsed - 2:.1f}s past a 2s JOB_TIMEOUT_S"
    assert_clean(work_dir)
    # the same worker, with a deadline a busy CI machine can't hit, completes a job: the
    # interrupted pipeline is usable again
    worker.settings = worker.settings.model_copy(update={"job_timeout_s": 300.0})
    assert handle(worker, SMALL_IMAGE)["status"] == "completed"


def test_each_job_gets_its_own_temp_dir_removed_afterwards(tiny_models, s3, work_dir, monkeypatch):
    from wan_worker.serving import flow

    seen: list[Path] = []
    real_generate = flow.generate

    def spy(rt, run, prompt, cond, refs, out_dir):  # the first stage that writes into the job's dir
        assert list(out_dir.iterdir()) == [], "a job saw another job's files"
        assert out_dir.parent == work_dir
        seen.append(out_dir)
        return real_generate(rt, run, prompt, cond, refs, out_dir)

    monkeypatch.setattr(flow, "generate", spy)
    worker = tiny_worker(tiny_models, **s3_settings(s3), work_dir=work_dir)
    assert handle(worker, {**SMALL_VIDEO, "id": "tmp-a"})["status"] == "completed"
    assert handle(worker, {**SMALL_IMAGE, "id": "tmp-b"})["status"] == "completed"
    failing = tiny_worker(
        tiny_models, **s3_settings(s3, f"http://127.0.0.1:{free_port()}"), work_dir=work_dir, upload_attempts=1
    )
    assert handle(failing, {**SMALL_IMAGE, "id": "tmp-c"})["error_code"] == "storage_error"
    assert len(seen) == len(set(seen)) == 3
    assert all(job in path.name for path, job in zip(seen, ("tmp-a", "tmp-b", "tmp-c"), strict=False))
    assert not any(path.exists() for path in seen)
    assert_clean(work_dir)
