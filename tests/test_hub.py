"""RunPod polish: the Hub files, concurrency_modifier, and what handler.py starts.

The structure checked is the Hub's (RunPod's publishing guide):
``hub.json`` {title, description, type, category, config{runsOn, containerDiskInGb, gpuCount,
gpuIds, allowedCudaVersions, env[{key, input{name, type, description, default}}]}} and
``tests.json`` {tests[{name, input, timeout}], config{gpuTypeId, gpuCount, env[{key, value}],
allowedCudaVersions}}. The tests must be the real ``video_fast`` job and a reference job.
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
from helpers.inprocess import handle, tiny_worker
from helpers.workers import ROOT

HUB = ROOT / ".runpod" / "hub.json"
TESTS = ROOT / ".runpod" / "tests.json"
CUDA = re.compile(r"^\d{2}\.\d$")
#: Variables the worker reads that are not ``Settings`` fields.
OTHER_ENV = {"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL", "PYTORCH_CUDA_ALLOC_CONF"}


def load(path: Path) -> dict:
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text())


def known_env(key: str) -> bool:
    from wan_worker.contract.settings import Settings

    return key.lower() in Settings.model_fields or key in OTHER_ENV


def dockerfile_cuda() -> tuple[int, int]:
    match = re.search(r"^FROM\s+\S*cuda:?(\d+)\.(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile's base image names no CUDA version"
    return int(match.group(1)), int(match.group(2))


def test_hub_json_structure():
    hub = load(HUB)
    for field in ("title", "description", "type", "category", "config"):
        assert field in hub, field
    assert isinstance(hub["title"], str) and hub["title"].strip()
    assert isinstance(hub["description"], str) and len(hub["description"]) > 40
    assert hub["type"] == "serverless"
    assert hub["category"] in ("audio", "embedding", "language", "video", "image")
    config = hub["config"]
    assert config["runsOn"] == "GPU"
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 20
    assert config["gpuCount"] == 1
    assert isinstance(config["gpuIds"], str) and all(
        re.fullmatch(r"[A-Z]+_\d+(_PRO)?", pool) for pool in config["gpuIds"].split(",")
    ), config["gpuIds"]
    assert config["allowedCudaVersions"] and all(CUDA.match(v) for v in config["allowedCudaVersions"])
    keys = []
    for entry in config["env"]:
        assert set(entry) in ({"key", "input"}, {"key", "value"}), entry
        keys.append(entry["key"])
        assert known_env(entry["key"]), f"hub.json sets {entry['key']}, which the worker never reads"
        if "input" in entry:
            spec = entry["input"]
            assert {"name", "type", "description", "default"} <= set(spec), entry
            kind = {"string": str, "number": (int, float), "boolean": bool}[spec["type"]]
            assert isinstance(spec["default"], kind) and not (spec["type"] == "number" and spec["default"] is True)
            assert set(spec) <= {"name", "type", "description", "default", "advanced", "options"}, entry
    assert len(keys) == len(set(keys)), "an env key appears twice"
    for required in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "CALLBACK_SECRET"):
        assert required in keys
    # A secret must never have a non-empty default checked into the repo.
    for entry in config["env"]:
        if entry["key"] in ("BUCKET_SECRET_ACCESS_KEY", "CALLBACK_SECRET", "HF_TOKEN"):
            assert entry["input"]["default"] == ""


def test_tests_json_structure():
    spec = load(TESTS)
    assert set(spec) == {"tests", "config"}
    assert len(spec["tests"]) >= 2
    for test in spec["tests"]:
        assert set(test) == {"name", "input", "timeout"}, test.keys()
        assert isinstance(test["name"], str) and test["name"]
        assert isinstance(test["input"], dict)
        assert isinstance(test["timeout"], int) and 60_000 <= test["timeout"] <= 3_600_000  # milliseconds
    assert len({t["name"] for t in spec["tests"]}) == len(spec["tests"])
    config = spec["config"]
    assert set(config) == {"gpuTypeId", "gpuCount", "env", "allowedCudaVersions"}
    assert isinstance(config["gpuTypeId"], str) and config["gpuTypeId"].startswith("NVIDIA ")
    assert config["gpuCount"] == 1
    for entry in config["env"]:
        assert set(entry) == {"key", "value"} and isinstance(entry["value"], str), entry
        assert known_env(entry["key"]), entry["key"]
    assert config["allowedCudaVersions"] and all(CUDA.match(v) for v in config["allowedCudaVersions"])
    assert set(config["allowedCudaVersions"]) <= set(load(HUB)["config"]["allowedCudaVersions"])


def test_cuda_versions_match_the_dockerfile_base():
    base = dockerfile_cuda()
    for path in (HUB, TESTS):
        for version in load(path)["config"]["allowedCudaVersions"]:
            major, minor = (int(p) for p in version.split("."))
            assert (major, minor) >= base, f"{path.name} allows CUDA {version}, older than the image's {base}"


def test_hub_tests_are_the_real_video_fast_job_and_a_reference_job():
    from wan_worker.contract.jobs import build_job
    from wan_worker.contract.schema import parse_job_input
    from wan_worker.contract.settings import Settings
    from wan_worker.stages.references import load_reference

    tests = load(TESTS)["tests"]
    jobs = [build_job(parse_job_input(t["input"]), job_id="hub") for t in tests]
    fast, ref = jobs[0], jobs[1]
    assert tests[0]["input"] == load(ROOT / "test_input.json")["input"]  # the repo's real video_fast job
    assert fast.job_type == "video_fast" and fast.kind == "video" and fast.reference_mode_requested == "none"
    assert (fast.width, fast.height, fast.num_frames, fast.steps) == (480, 832, 81, 25)
    assert ref.job_type == "video_fast" and ref.pipeline == "vace"
    assert ref.reference_mode_requested != "none" and ref.references and ref.strict_references
    settings = Settings()
    for source in ref.references.values():
        # Self-contained (no network needed on the Hub's test worker) and a decodable image.
        assert source.value.startswith("data:image/")
        image = load_reference(source.value, settings)
        assert min(image.size) >= 32


def test_inline_results_of_the_hub_tests_fit_runpods_payload_limit():
    env = {e["key"]: e["value"] for e in load(TESTS)["config"]["env"]}
    assert "BUCKET_ENDPOINT_URL" not in env  # the Hub's test worker has no bucket: results come back inline
    cap = int(env.get("INLINE_MAX_BYTES", 5 * 1024 * 1024))
    assert cap * 4 / 3 + 100_000 < 20_000_000, "base64 of a result at the cap exceeds RunPod's 20 MB /runsync limit"
    timeout_s = int(env.get("JOB_TIMEOUT_S", 900))
    assert all(timeout_s * 1000 < t["timeout"] for t in load(TESTS)["tests"]), "the worker must time out first"


def test_reference_hub_test_runs_on_the_tiny_profile(tiny_models):
    """The reference test's own input, shrunk in size only, through the real pipeline."""
    test = load(TESTS)["tests"][1]
    small = {**test["input"], "width": 256, "height": 256, "frame_num": 5, "config": {"num_inference_steps": 1}}
    out = handle(tiny_worker(tiny_models), small)
    assert out["status"] == "completed", out
    meta = out["assets"][0]["metadata"]
    assert meta["reference_mode_applied"] == test["input"]["reference_mode"] and meta["pipeline"] == "vace"


def test_concurrency_modifier_defaults_to_one_and_is_capped_at_two(monkeypatch):
    """Two jobs overlap one's CPU tail with the other's GPU stages; a third would only wait."""
    from wan_worker.contract import settings as settings_module
    from wan_worker.serving.worker import concurrency_modifier

    monkeypatch.delenv("WORKER_CONCURRENCY", raising=False)
    settings_module.get_settings.cache_clear()
    try:
        assert concurrency_modifier(0) == 1 and concurrency_modifier(5) == 1
        monkeypatch.setenv("WORKER_CONCURRENCY", "2")
        settings_module.get_settings.cache_clear()
        assert concurrency_modifier(1) == 2
        monkeypatch.setenv("WORKER_CONCURRENCY", "3")
        settings_module.get_settings.cache_clear()
        assert concurrency_modifier(1) == 2
        monkeypatch.setenv("WORKER_CONCURRENCY", "0")
        settings_module.get_settings.cache_clear()
        with pytest.raises(Exception, match="worker_concurrency"):
            concurrency_modifier(1)
    finally:
        settings_module.get_settings.cache_clear()


def test_handler_starts_the_sdk_with_handler_and_concurrency_modifier(monkeypatch):
    import runpod

    from wan_worker.contract import settings as settings_module
    from wan_worker.serving import worker as worker_module

    started: list[dict] = []
    monkeypatch.setattr(runpod.serverless, "start", started.append)
    monkeypatch.setattr(worker_module, "_worker", None)
    monkeypatch.setenv("MODEL_PROFILE", "tiny")
    monkeypatch.delenv("WARMUP_ON_START", raising=False)
    for name in ("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"):  # restored as absent afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    settings_module.get_settings.cache_clear()
    try:
        runpy.run_path(str(ROOT / "handler.py"), run_name="__main__")
    finally:
        settings_module.get_settings.cache_clear()
        monkeypatch.setattr(worker_module, "_worker", None)
    # The SDK's default DEBUG level logs whole job outputs (prompts): the worker sets INFO.
    from runpod.serverless.modules.rp_logger import RunPodLogger

    assert RunPodLogger().level == "INFO"
    (config,) = started
    assert config["handler"] is worker_module.handler
    assert config["concurrency_modifier"] is worker_module.concurrency_modifier
    assert "refresh_worker" not in config  # per job instead: the handler's output asks after CUDA faults


def test_hub_dockerfile_is_the_root_one_with_baked_weights():
    """The Hub's test worker has no network volume, so the Hub image bakes the weights."""
    hub = (ROOT / ".runpod" / "Dockerfile").read_text().splitlines()
    root = (ROOT / "Dockerfile").read_text().splitlines()
    body = [line for line in hub[3:]]  # after the three-line header
    assert [line.replace("ARG BAKE_MODELS=1", "ARG BAKE_MODELS=0") for line in body] == root, (
        ".runpod/Dockerfile drifted from the root Dockerfile: regenerate it (docs/DEPLOY.md)"
    )
    assert "ARG BAKE_MODELS=1" in body and 'CMD ["python", "-u", "handler.py"]' in body


def _as_env_text(value) -> str:
    """A default as a variable's text: booleans lower case, whole floats without ``.0``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_hub_readme_and_settings_agree_on_defaults():
    from wan_worker.contract.settings import Settings

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", readme, re.MULTILINE))
    for entry in load(HUB)["config"]["env"]:
        key, hub_default = entry["key"], entry["input"]["default"]
        field = Settings.model_fields.get(key.lower())
        if field is None:
            continue
        assert _as_env_text(hub_default) == _as_env_text(field.default), key
        documented = rows.get(key, "").strip().strip("`")
        if documented not in ("", "-", "unset"):
            assert documented == _as_env_text(field.default), f"README's default for {key}: {documented}"
    disk = load(HUB)["config"]["containerDiskInGb"]
    assert f"asks for {disk}" in (ROOT / "docs" / "DEPLOY.md").read_text(), "DEPLOY's container disk row"
