"""Metrics and logs: one JSON ``job_metrics`` line per job, hashed prompts, and no
secret value anywhere in logs, outputs or callbacks, across every job type and error path.

Privacy decision (docs/OPERATIONS.md): prompts appear in logs only as ``prompt_sha256`` (the
first 16 hex characters of the SHA-256 of the UTF-8 prompt) and ``prompt_chars`` (its length).
``BUCKET_ACCESS_KEY_ID`` is an identifier that presigned SigV4 URLs carry by design, so it is
not a secret value here; ``debug_env`` still reports it only as set/unset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers.callbacks import CallbackReceiver
from helpers.inprocess import SMALL_IMAGE, SMALL_VIDEO, handle, png_data_uri, s3_settings, tiny_worker
from helpers.logcapture import CALLBACK_SECRET, SECRETS
from helpers.workers import start_api_worker, stop, worker_env

from wan_worker.contract.presets import JOB_TYPES as PRESET_JOB_TYPES
from wan_worker.infra.local_s3 import ACCESS_KEY as S3_KEY
from wan_worker.infra.local_s3 import free_port

JOB_TYPES = list(PRESET_JOB_TYPES)  # the one vocabulary, in its order
METRIC_FIELDS = {
    "event",
    "worker",
    "job_type",
    "status",
    "error_code",
    "generation_time",
    "timings",
    "video_duration",
    "file_size",
    "resolution",
    "fps",
    "quality",
    "reference_mode",
    "enhancement_applied",
    "peak_vram_gib",
    "prompt_sha256",
    "prompt_chars",
    "flags",
}


def small(job_type: str, prompt: str, **extra) -> dict:
    return {
        "job_type": job_type,
        "prompt": prompt,
        "width": 256,
        "height": 256,
        "frame_num": 5,
        "seed": 9,
        "config": {"num_inference_steps": 1},
        **extra,
    }


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def json_records(text: str) -> list[dict]:
    """The worker's JSON log records in a process's merged stdout+stderr. The SDK prints a
    message and its newline in two writes, so a record can start mid-line after one."""
    decoder, records = json.JSONDecoder(), []
    for line in text.splitlines():
        start = line.find('{"ts": ')
        if start >= 0:
            records.append(decoder.raw_decode(line[start:])[0])
    return records


def assert_no_secret(text: str, where: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked into {where}"


# --------------------------------------------------------------------------------------------
# One worker process with known secrets in its environment, through the RunPod SDK's own API.


@pytest.fixture(scope="module")
def secret_run(tiny_models, s3, tmp_path_factory):
    """Every job type, every reference mode, every action and the per-job error paths."""
    ref = png_data_uri()
    jobs: list[tuple[str, dict | str]] = []
    for i, job_type in enumerate(JOB_TYPES):
        jobs.append((f"type:{job_type}", small(job_type, f"zebra secret-run prompt {i} {job_type}")))
    for mode, fields in {
        "single": {"reference_image_url": ref},
        "start": {"first_frame": ref},
        "end": {"last_frame": ref},
        "both": {"first_frame": ref, "last_frame": ref},
    }.items():
        jobs.append(
            (
                f"video-ref:{mode}",
                small("video_fast", f"zebra reference {mode}", reference_mode=mode, strict_references=True, **fields),
            )
        )
    jobs.append(
        ("image-ref:i2i", small("image_fast", "zebra image to image", reference_image_url=ref, strict_references=True))
    )
    jobs += [
        ("action:health", {"action": "health"}),
        ("action:debug_env", {"action": "debug_env"}),
        ("action:enhance", {"action": "enhance", "prompt": "zebra enhance action"}),
        ("error:invalid", small("video_fast", "zebra invalid", width="wide")),
        ("error:unknown-type", {"job_type": "video_ultra", "prompt": "zebra unknown type"}),
        (
            "error:bad-base64",
            small("video_fast", "zebra bad base64", strict_references=True, first_frame="data:image/png;base64,@@@@"),
        ),
        (
            "error:private-host",
            small(
                "video_fast",
                "zebra private host",
                strict_references=True,
                first_frame=f"http://127.0.0.1:{free_port()}/x.png",
            ),
        ),
        ("error:missing-reference", small("video_fast", "zebra missing ref", reference_mode="both")),
    ]
    receiver = CallbackReceiver(statuses=[500])
    env = worker_env(
        tiny_models,
        **{
            **s3.env(),
            **SECRETS,
            "CALLBACK_URL": receiver.url,
            "ALLOW_PRIVATE_REFERENCE_URLS": "0",
            "UPLOAD_ATTEMPTS": "2",
            "ENHANCE_MAX_NEW_TOKENS": "16",
        },
    )
    worker = start_api_worker(env, tmp_path_factory.mktemp("secret-run") / "worker.log")
    try:
        responses = {name: worker.runsync(job) for name, job in jobs}
    finally:
        stop(worker.proc)
        receiver.close()
    return {"jobs": dict(jobs), "responses": responses, "logs": worker.logs(), "callbacks": receiver.deliveries}


def test_every_job_type_and_reference_mode_completes(secret_run):
    for name, response in secret_run["responses"].items():
        if name.startswith(("type:", "video-ref:", "image-ref:")):
            assert response["status"] == "COMPLETED", (name, response)
            out = response["output"]
            assert out["assets"] and out["callback_delivered"] is True
        if name.startswith("video-ref:"):
            assert out["assets"][0]["metadata"]["reference_mode_applied"] == name.split(":")[1]
        if name.startswith("error:"):
            assert response["status"] == "FAILED", (name, response)


def test_no_secret_in_logs_outputs_or_callbacks(secret_run):
    assert_no_secret(secret_run["logs"], "the worker's logs (stdout+stderr)")
    for name, response in secret_run["responses"].items():
        assert_no_secret(json.dumps(response), f"the output of {name}")
    for delivery in secret_run["callbacks"]:
        assert delivery.signature_ok
        assert_no_secret(delivery.body.decode() + json.dumps(delivery.headers), "a callback")
    debug = secret_run["responses"]["action:debug_env"]["output"]
    for name in [*SECRETS, "BUCKET_ACCESS_KEY_ID"]:
        assert debug["env_set"][name] is True
    assert S3_KEY not in json.dumps(debug)  # the key id is only reported as set
    # Every generation job (completed or failed after validation) called back; rejected ones too.
    generation = [n for n in secret_run["jobs"] if not n.startswith("action:")]
    assert len(secret_run["callbacks"]) == len(generation) + 1  # + one retry after the first 500


def test_one_metrics_line_per_job_with_hashed_prompts(secret_run):
    lines = json_records(secret_run["logs"])
    metrics = [r for r in lines if r.get("event") == "job_metrics"]
    generation = [n for n in secret_run["jobs"] if not n.startswith("action:")]
    assert len(metrics) == len(generation)
    completed = [m for m in metrics if m["status"] == "completed"]
    by_hash = {prompt_hash(j["prompt"]): n for n, j in secret_run["jobs"].items() if "prompt" in j}
    assert sorted(m["job_type"] for m in completed if m["reference_mode"] == "none") == sorted(JOB_TYPES)
    for m in completed:
        assert set(m) >= METRIC_FIELDS, set(METRIC_FIELDS) - set(m)
        assert m["worker"] == "wan" and m["resolution"] == "256x256"
        assert m["generation_time"] > 0 and m["timings"]["denoising"] >= 0
        assert m["file_size"] > 0 and m["error_code"] is None
        name = by_hash[m["prompt_sha256"]]
        job, out = secret_run["jobs"][name], secret_run["responses"][name]["output"]
        assert m["prompt_chars"] == len(job["prompt"]) and m["job_type"] == job["job_type"]
        assert m["file_size"] == out["assets"][0]["metadata"]["file_size_bytes"]
        assert m["reference_mode"] == out["assets"][0]["metadata"]["reference_mode_applied"]
        if m["job_type"].startswith("video"):
            assert m["fps"] == 16 and m["video_duration"] == round(5 / 16, 4)
        else:
            assert m["fps"] is None and m["video_duration"] == 0
        # Tiny Qwen writes noise, so enhancement may fall back; the metric says what happened.
        assert m["enhancement_applied"] is out["metadata"]["enhancement_applied"]
        if "enhanced" not in m["job_type"]:
            assert m["enhancement_applied"] is False
        else:
            assert "enhancing" in m["timings"]
    assert {m["error_code"] for m in metrics if m["status"] == "failed"} == {"invalid_input", "reference_unavailable"}
    # Prompts are never logged in clear, by our logs or the SDK's.
    for job in secret_run["jobs"].values():
        if job.get("prompt"):
            assert job["prompt"] not in secret_run["logs"], job["prompt"]


# --------------------------------------------------------------------------------------------
# In process: flags, and every worker-level error path with the secrets in the environment.


def test_metrics_flags(tiny_models, s3, captured_logs):
    flagged = tiny_worker(tiny_models, **s3_settings(s3), slow_generation_s=0.001, small_file_bytes=10**9)
    plain = tiny_worker(tiny_models, **s3_settings(s3), slow_generation_s=3600, small_file_bytes=0)
    prompt = "an unmistakable zebra prompt for the flags test"
    video = {**SMALL_VIDEO, "frame_num": 1, "prompt": prompt}  # one frame: still a video, a small file
    out1 = handle(flagged, {**video, "id": "log-flags-1"})
    out2 = handle(plain, {**video, "id": "log-flags-2"})
    out3 = handle(flagged, {**SMALL_IMAGE, "id": "log-flags-3"})  # images are never "small files"
    assert all(o["status"] == "completed" for o in (out1, out2, out3))
    m1, m2, m3 = captured_logs.events("job_metrics")
    assert m1["flags"] == ["slow_generation", "small_file"]
    assert m2["flags"] == []
    assert m3["flags"] == ["slow_generation"]
    assert m1["job_id"] == "local" and m1["file_size"] == out1["assets"][0]["metadata"]["file_size_bytes"]
    assert m1["prompt_sha256"] == prompt_hash(prompt) and m1["prompt_chars"] == len(prompt)
    assert prompt not in captured_logs.text


def env_worker(monkeypatch, tmp_path: Path, **env: str):
    """A worker whose settings come from the environment, as in production."""
    from wan_worker.contract.settings import Settings
    from wan_worker.serving.worker import Worker

    for name in list(__import__("os").environ):
        if name.startswith(("BUCKET_", "CALLBACK_", "RUNPOD_", "HF_TOKEN", "MODEL", "JOB_", "UPLOAD_")):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert set(settings.secret_values()) >= set(SECRETS.values())
    return Worker(settings)


class _RaiseInForward:
    """A forward pre-hook on the transformer that raises a given exception (a real fault point)."""

    def __init__(self, worker, exc: BaseException) -> None:
        worker.manager.encoder_pipe()
        self.handle = worker.manager.encoder_pipe().transformer.register_forward_pre_hook(self)
        self.exc = exc

    def __call__(self, module, args):
        raise self.exc


def test_error_paths_leak_no_secret(tiny_models, s3, tmp_path, monkeypatch, captured_logs):
    base = {
        "MODEL_PROFILE": "tiny",
        "TINY_MODELS_DIR": str(tiny_models),
        "ALLOW_PRIVATE_REFERENCE_URLS": "1",
        **s3.env(),
        **SECRETS,
        "UPLOAD_ATTEMPTS": "1",
        "CALLBACK_ATTEMPTS": "1",
    }
    outputs = []

    def run(worker, job_input, job_id="leak"):
        outputs.append(out := handle(worker, job_input, job_id=job_id))
        return out

    with CallbackReceiver(statuses=[200, 200, 200, 403]) as receiver:
        worker = env_worker(monkeypatch, tmp_path, **{**base, "CALLBACK_URL": receiver.url})
        assert run(worker, {**SMALL_IMAGE, "width": 7})["error_code"] == "invalid_input"
        assert run(worker, ["not", "an", "object"])["error_code"] == "invalid_input"
        assert (
            run(worker, {**SMALL_IMAGE, "strict_references": True, "reference_image_url": "data:image/png;base64,!!"})[
                "error_code"
            ]
            == "reference_unavailable"
        )
        assert run(worker, SMALL_IMAGE)["callback_delivered"] is False  # 403: refused
        assert [d.status for d in receiver.deliveries] == [200, 200, 200, 403]
        assert run(worker, {"action": "debug_env"})["env_set"]["CALLBACK_SECRET"] is True
        assert run(worker, {"action": "health"})["status"] == "healthy"

        # A secret that reaches an exception message is redacted in the logs, and the
        # output names only the exception type.
        hook = _RaiseInForward(worker, RuntimeError(f"boom {SECRETS['BUCKET_SECRET_ACCESS_KEY']} {CALLBACK_SECRET}"))
        out = run(worker, SMALL_IMAGE)
        assert out["error_code"] == "internal_error" and "RuntimeError" in out["error"]
        hook.handle.remove()
        assert "[REDACTED]" in captured_logs.text

        hook = _RaiseInForward(worker, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        out = run(worker, SMALL_IMAGE)
        assert out["error_code"] == "out_of_memory" and out["refresh_worker"] is True
        hook.handle.remove()

    worker = env_worker(monkeypatch, tmp_path, **{**base, "BUCKET_ACCESS_KEY_ID": "unknown-key-id"})
    out = run(worker, SMALL_IMAGE)
    assert out["error_code"] == "storage_error" and out["retryable"] is False

    worker = env_worker(monkeypatch, tmp_path, **{**base, "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    out = run(worker, SMALL_IMAGE)
    assert out["error_code"] == "storage_error" and out["retryable"] is True

    worker = env_worker(monkeypatch, tmp_path, **{**base, "JOB_TIMEOUT_S": "0.001"})
    assert run(worker, SMALL_IMAGE)["error_code"] == "job_timeout"

    empty = tmp_path / "no-models"
    empty.mkdir()
    worker = env_worker(
        monkeypatch, tmp_path, **{**base, "MODEL_PROFILE": "full", "MODELS_DIR": str(empty), "HF_HOME": str(empty)}
    )
    out = run(worker, SMALL_IMAGE)
    assert out["error_code"] == "model_unavailable" and "download_models.py" in out["error"]

    assert_no_secret(captured_logs.text, "the captured logs")
    assert_no_secret(json.dumps(outputs) + repr(outputs), "the outputs")
    codes = [r.get("error_code") for r in captured_logs.events("job_metrics")]
    assert len(codes) == 12 - 2  # one line per job; actions are not jobs
