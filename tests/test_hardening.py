"""Worker-side hardening: a worker that can't serve stays up and says why; WORK_DIR is checked
before generation; a failed upload removes what it stored; a reused ``id`` never overwrites
another RunPod job's files; concurrency is capped at 2; secrets in the SDK's prints are masked;
local runs post no progress."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import requests
from helpers.faultproxy import FaultProxy
from helpers.inprocess import SMALL_IMAGE, handle, s3_settings, tiny_worker
from helpers.workers import ROOT, run_test_input, start_api_worker, stop, worker_env

from wan_worker.infra.local_s3 import BUCKET
from wan_worker.runtime.tiny import T2V_DIR


def json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(record := json.loads(line), dict):
                records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# 1. No weights: start anyway, say why, fail generate jobs clearly, recover when they appear


def test_worker_without_weights_starts_reports_and_recovers(tiny_models, tmp_path):
    models, baked, hf_home = (tmp_path / name for name in ("models", "baked", "hf-home"))
    for path in (models, baked, hf_home):
        path.mkdir()
    env = worker_env(
        tiny_models,
        MODEL_PROFILE="full",
        MODELS_DIR=str(models),
        BAKED_MODELS_DIR=str(baked),
        HF_HOME=str(hf_home),
        WARMUP_ON_START="true",
    )
    worker = start_api_worker(env, tmp_path / "worker.log")
    try:
        health = worker.runsync({"action": "health"})
        assert health["status"] == "COMPLETED", health
        out = health["output"]
        assert out["worker_ready"] is False and out["status"] == "unhealthy", out
        assert "warm-up at start failed" in out["reason"] and "not found" in out["reason"], out["reason"]

        for attempt in range(2):  # every generate job fails the same clear way, and the worker keeps serving
            job = worker.runsync({**SMALL_IMAGE, "id": f"no-weights-{attempt}"})
            assert job["status"] == "FAILED", job
            for searched in (models, baked, hf_home / "hub"):
                assert str(searched) in job["error"], (searched, job["error"])
            assert "download_models.py" in job["error"]
            assert worker.proc.poll() is None
        # The local API returns only the error text; the error code is in each job's metrics line.
        codes = [r["error_code"] for r in json_lines(worker.logs()) if r.get("event") == "job_metrics"]
        assert codes == ["model_unavailable", "model_unavailable"], codes

        # The weights appear (a volume mounted late): the next job loads them and the worker is ready.
        (models / T2V_DIR).symlink_to(tiny_models / T2V_DIR)
        done = worker.runsync({**SMALL_IMAGE, "id": "weights-now"})
        assert done["status"] == "COMPLETED", done
        assert done["output"]["assets"][0]["metadata"]["frames"] == 1
        health = worker.runsync({"action": "health"})["output"]
        assert health["worker_ready"] is True and health["reason"] is None and health["wan_loaded"] is True
    finally:
        stop(worker.proc)
    assert "Traceback" not in worker.logs()


def _started_worker(monkeypatch, worker, fault: BaseException):
    from wan_worker.serving import worker as worker_module

    def warm_up(*args):
        raise fault

    monkeypatch.setattr(worker.manager, "warm_up", warm_up)
    monkeypatch.setattr(worker_module, "_worker", worker)
    return worker_module.serverless_config()


def test_warm_up_failure_other_than_cuda_starts_not_ready(tiny_models, monkeypatch):
    worker = tiny_worker(tiny_models, warmup_on_start=True)
    config = _started_worker(monkeypatch, worker, ValueError("compile exploded"))
    assert config["handler"] and config["concurrency_modifier"]
    health = handle(worker, {"action": "health"})
    assert health["worker_ready"] is False and "ValueError: compile exploded" in health["reason"]
    # A job takes the normal loading path; it completes and the worker becomes ready.
    assert handle(worker, SMALL_IMAGE)["status"] == "completed"
    assert handle(worker, {"action": "health"})["worker_ready"] is True


def test_cuda_fault_at_warm_up_exits_so_runpod_replaces_the_worker(tiny_models, monkeypatch):
    worker = tiny_worker(tiny_models, warmup_on_start=True)
    with pytest.raises(SystemExit) as exited:
        _started_worker(monkeypatch, worker, RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert exited.value.code == 1


# --------------------------------------------------------------------------------------------
# 2. WORK_DIR


def test_missing_work_dir_is_reported_and_fails_jobs_before_generation(tiny_models, tmp_path):
    work_dir = tmp_path / "not-yet"
    worker = tiny_worker(tiny_models, work_dir=work_dir)
    health = handle(worker, {"action": "health"})
    assert health["worker_ready"] is False and "WORK_DIR" in health["reason"] and str(work_dir) in health["reason"]
    progress: list[dict] = []
    out = handle(worker, {**SMALL_IMAGE, "id": "no-work-dir"}, progress=progress)
    assert out["error_code"] == "work_dir_unavailable" and out["retryable"] is True, out
    assert "WORK_DIR" in out["error"] and str(work_dir) in out["error"] and out["job_id"] == "no-work-dir"
    assert [p["stage"] for p in progress] == ["validating"], "the job went past validation"
    assert not worker.manager.wan_loaded  # no model was loaded for a job that could not finish

    work_dir.mkdir()  # fixed: the next job runs, and health says ready
    assert handle(worker, SMALL_IMAGE)["status"] == "completed"
    assert handle(worker, {"action": "health"})["worker_ready"] is True
    assert list(work_dir.iterdir()) == []


def test_read_only_work_dir_is_reported(tiny_models, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here ({result.stderr.decode().strip()})")
    else:
        ro.chmod(0o555)
    try:
        worker = tiny_worker(tiny_models, work_dir=ro)
        health = handle(worker, {"action": "health"})
        assert health["worker_ready"] is False and "WORK_DIR" in health["reason"], health
        out = handle(worker, SMALL_IMAGE)
        assert out["error_code"] == "work_dir_unavailable" and "WORK_DIR" in out["error"], out
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


# --------------------------------------------------------------------------------------------
# 3. Storage: cleanup after a partial upload, no overwrite across RunPod jobs


@pytest.fixture
def proxy(s3):
    proxy = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


def exists(client, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)
    except Exception as exc:  # noqa: BLE001
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey"), exc  # type: ignore[attr-defined]
        return False
    return True


def test_failed_thumbnail_upload_removes_the_uploaded_image(tiny_models, s3, proxy):
    proxy.fail, proxy.match = 10**6, lambda method, path: method == "PUT" and path.endswith("0.thumb.webp")
    worker = tiny_worker(tiny_models, **s3_settings(s3, proxy.endpoint), upload_attempts=1)
    out = handle(worker, {**SMALL_IMAGE, "id": "thumb-fails", "user_id": "u-clean"})
    assert out["error_code"] == "storage_error" and "assets" not in out, out
    assert ("PUT", f"/{BUCKET}/u-clean/thumb-fails/0.png", 200) in proxy.log  # the image did land
    assert not exists(s3.client(), "u-clean/thumb-fails/0.png"), "the failed job's image was left in the bucket"
    assert "deleted again" in out["error"] and "nothing of this job is stored" in out["error"]
    assert out["details"]["left_in_bucket"] == []


def test_failed_cleanup_names_what_is_left(tiny_models, s3, proxy):
    proxy.fail = 10**6
    proxy.match = lambda method, path: (method == "PUT" and path.endswith("0.thumb.webp")) or method == "DELETE"
    worker = tiny_worker(tiny_models, **s3_settings(s3, proxy.endpoint), upload_attempts=1)
    out = handle(worker, {**SMALL_IMAGE, "id": "cleanup-fails", "user_id": "u-clean"})
    assert out["error_code"] == "storage_error", out
    key = "u-clean/cleanup-fails/0.png"
    assert out["details"]["left_in_bucket"] == [key]
    assert f"left in the bucket (could not delete): {key}" in out["error"]
    assert exists(s3.client(), key)


def test_reused_id_never_overwrites_another_runpod_jobs_files(tiny_models, s3):
    worker = tiny_worker(tiny_models, **s3_settings(s3))
    job = {**SMALL_IMAGE, "id": "dup-1", "user_id": "u-dup"}
    first = handle(worker, {**job, "seed": 1}, job_id="rp-A")
    assert first["assets"][0]["path"] == "u-dup/dup-1/0.png", first
    original = requests.get(first["assets"][0]["url"], timeout=30).content

    # A retry of the same RunPod job may overwrite its own files: same keys, no warning.
    retry = handle(worker, {**job, "seed": 1}, job_id="rp-A")
    assert retry["assets"][0]["path"] == "u-dup/dup-1/0.png" and not any("already" in w for w in retry["warnings"])

    # A different RunPod job with the same id: its own keys, said so; the first job's URL still serves its result.
    other = handle(worker, {**job, "seed": 2}, job_id="rp-B")
    asset = other["assets"][0]
    assert asset["path"].startswith("u-dup/dup-1-") and asset["path"].endswith("/0.png"), asset
    assert asset["thumbnail_path"] == asset["path"].replace("0.png", "0.thumb.webp")
    assert any("already has results stored by another RunPod job" in w for w in other["warnings"])
    assert requests.get(first["assets"][0]["url"], timeout=30).content == original
    assert requests.get(asset["url"], timeout=30).content != original
    head = s3.client().head_object(Bucket=BUCKET, Key="u-dup/dup-1/0.png")
    assert head["Metadata"]["runpod-job-id"] == "rp-A"
    # ... and a retry of that second RunPod job lands on its own keys again.
    again = handle(worker, {**job, "seed": 2}, job_id="rp-B")
    assert again["assets"][0]["path"] == asset["path"]


# --------------------------------------------------------------------------------------------
# 5, 6. The SDK's prints are redacted; local runs post no progress


def test_secret_printed_by_the_sdk_logger_is_redacted(tiny_models):
    secret = "cb-secret-in-an-sdk-print-41d9"
    code = (
        "from wan_worker.serving.worker import get_worker\n"
        "get_worker()\n"
        "from runpod.serverless.modules.rp_logger import RunPodLogger\n"
        f"RunPodLogger().info('callback secret is {secret} here')\n"
        f"print('plain print of {secret}')\n"
        f"import sys; sys.stderr.write('stderr {secret}\\n')\n"
    )
    env = worker_env(tiny_models, CALLBACK_SECRET=secret)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "callback secret is [REDACTED] here" in proc.stdout
    assert "plain print of [REDACTED]" in proc.stdout and "stderr [REDACTED]" in proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_local_test_input_posts_no_progress(tiny_models, s3):
    code, out, logs = run_test_input({**SMALL_IMAGE, "id": "local-progress"}, worker_env(tiny_models, **s3.env()))
    assert code == 0 and out["status"] == "completed", logs[-3000:]
    assert "Failed to return job results" not in logs


# --------------------------------------------------------------------------------------------
# 4. Concurrency


def test_worker_concurrency_above_two_is_capped_with_a_warning(tiny_models, monkeypatch, captured_logs):
    from wan_worker.contract import settings as settings_module
    from wan_worker.serving import worker as worker_module

    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    settings_module.get_settings.cache_clear()
    try:
        assert worker_module.concurrency_modifier(1) == 2
        worker = tiny_worker(tiny_models, worker_concurrency=4, warmup_on_start=False)
        monkeypatch.setattr(worker_module, "_worker", worker)
        started = time.monotonic()
        worker_module.serverless_config()
        assert time.monotonic() - started < 30
    finally:
        settings_module.get_settings.cache_clear()
    assert any("WORKER_CONCURRENCY=4 capped at 2" in r["msg"] for r in captured_logs.records())


def test_image_reference_fallback_says_text_to_image(tiny_models):
    worker = tiny_worker(tiny_models)
    out = handle(worker, {**SMALL_IMAGE, "reference_image_url": "data:image/png;base64,bm90IGFuIGltYWdl"})
    assert out["status"] == "completed", out
    assert any("fell back to text-to-image" in w for w in out["warnings"]), out["warnings"]
    assert not any("text-to-video" in w for w in out["warnings"])


def test_work_dir_probe_leaves_nothing_behind(tmp_path):
    from wan_worker.contract.settings import Settings
    from wan_worker.runtime.readiness import work_dir_problem

    assert work_dir_problem(Settings(work_dir=tmp_path)) is None
    assert list(tmp_path.iterdir()) == []
    assert "not a writable directory" in (work_dir_problem(Settings(work_dir=tmp_path / "missing")) or "")


# --------------------------------------------------------------------------------------------
# 7, 8. Documentation that must match the code


def table_codes(text: str, header: str) -> list[str]:
    """The first-column codes of the markdown table under ``header``."""
    lines = text.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(re.match(r"\|\s*`([a-z_]+)`", line).group(1))  # type: ignore[union-attr]
    return rows


def test_error_code_tables_match_the_error_codes():
    from wan_worker.contract.errors import ErrorCode

    codes = sorted(code.value for code in ErrorCode)
    readme = table_codes((ROOT / "README.md").read_text(), "| `error_code` | meaning |")
    assert sorted(readme) == codes, "README's error_code table drifted from ErrorCode"
    operations = table_codes(
        (ROOT / "docs" / "OPERATIONS.md").read_text(), "| `error_code` | retryable | restarts worker | cause |"
    )
    assert sorted(operations) == codes, "docs/OPERATIONS.md's error_code table drifted from ErrorCode"
    # Codes are defined once: no module passes a free string as an error code.
    for path in (ROOT / "src" / "wan_worker").glob("*.py"):
        assert not re.search(r"\bcode\s*=\s*[\"']", path.read_text()), f"{path.name} uses a free-string error code"


def test_hub_env_defaults_match_settings_defaults():
    from wan_worker.contract.settings import Settings

    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    checked = 0
    for entry in hub["config"]["env"]:
        field = Settings.model_fields.get(entry["key"].lower())
        if field is None:
            continue
        default, hub_default = field.default, entry["input"]["default"]
        if default is None:
            assert hub_default in ("", None), entry["key"]
        elif isinstance(default, bool):
            assert hub_default is default, (entry["key"], hub_default, default)
        elif isinstance(default, int | float):
            assert hub_default == default, (entry["key"], hub_default, default)
        else:
            assert str(hub_default) == str(default), (entry["key"], hub_default, default)
        checked += 1
    assert checked >= 10
    # The README's and DEPLOY's defaults for the same variables agree too.
    readme = (ROOT / "README.md").read_text()
    assert "| `WARMUP_ON_START` | `true` |" in readme
    assert "| `WARMUP_ON_START` | `true` (default) |" in (ROOT / "docs" / "DEPLOY.md").read_text()


def test_hub_container_disk_matches_deploy():
    """The Hub image bakes the weights (.runpod/Dockerfile), so it needs DEPLOY's baked disk size."""
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    match = re.search(
        r"\| Container disk \| (\d+) GB \(code-only\) / (\d+) GB \(baked", (ROOT / "docs/DEPLOY.md").read_text()
    )
    assert match, "docs/DEPLOY.md names no container disk sizes"
    assert hub["config"]["containerDiskInGb"] == int(match.group(2))
