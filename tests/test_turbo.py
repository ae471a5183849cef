"""``quality: "turbo"``: the DMD-distilled transformer and its few-step sampler, on the tiny profile.

End-to-end jobs go through ``handler.py --rp_serve_api``; the sampler itself is checked in
process against an independent plain-torch loop, with hooks on the real tiny models.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil

import pytest
import requests
import torch
from helpers.inprocess import SMALL_IMAGE, SMALL_VIDEO, handle, png_data_uri, tiny_worker
from helpers.mediacheck import open_image, probe_video
from safetensors import safe_open

from wan_worker.contract.jobs import build_job
from wan_worker.contract.schema import parse_job_input
from wan_worker.runtime.models import module_bytes
from wan_worker.runtime.tiny import TURBO_DIR

TURBO_MODEL = "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"
VIDEO = {**SMALL_VIDEO, "quality": "turbo", "config": {}}
IMAGE = {**SMALL_IMAGE, "quality": "turbo", "config": {}}


@pytest.fixture(scope="module")
def worker(tiny_models):
    return tiny_worker(tiny_models, inline_max_bytes=50_000_000)


def asset_bytes(out: dict) -> bytes:
    return base64.b64decode(out["assets"][0]["url"].split(",", 1)[1])


def check_turbo_metadata(meta: dict, steps: int = 3) -> None:
    assert meta["quality"] == "turbo" and meta["sampler"] == "dmd"
    assert meta["steps"] == meta["scheduler_steps"] == steps
    assert meta["timesteps"] == [1000, 757, 522][:steps]
    assert meta["guidance_scale"] == 1.0 and meta["flow_shift"] == 8.0
    assert meta["model"] == TURBO_MODEL
    assert meta["step_cache"] == {"mode": "off", "threshold": None}
    assert {"text_encoding", "denoising", "vae_decode", "encoding", "uploading"} <= set(meta["timings"])


# -- through the RunPod SDK's local API --------------------------------------------------------


def test_turbo_video_and_image_via_runsync(api_worker, tmp_path):
    out = api_worker.runsync({**VIDEO, "negative_prompt": "blurry"})
    assert out["status"] == "COMPLETED", out
    result = out["output"]
    check_turbo_metadata(result["metadata"])
    assert result["metadata"]["negative_prompt"] == ""
    assert any("negative_prompt unused" in w for w in result["warnings"])
    (asset,) = result["assets"]
    assert asset["type"] == "video" and asset["metadata"]["pipeline"] == "t2v"
    info = probe_video(requests.get(asset["url"], timeout=30).content, tmp_path)
    assert info.frames == 5 and (info.width, info.height) == (256, 256)

    image = api_worker.runsync({**SMALL_IMAGE, "config": {"quality": "turbo"}})  # the queue shape
    assert image["status"] == "COMPLETED", image
    check_turbo_metadata(image["output"]["metadata"])
    png = open_image(requests.get(image["output"]["assets"][0]["url"], timeout=30).content)
    assert png.format == "PNG" and png.size == (256, 256)

    fast = api_worker.runsync({**SMALL_IMAGE, "config": {"num_inference_steps": 1}})["output"]["metadata"]
    assert fast["sampler"] == "unipc" and fast["timesteps"] is None and fast["model"] != TURBO_MODEL


def test_unknown_quality_is_refused_via_runsync(api_worker):
    out = api_worker.runsync({**IMAGE, "quality": "ultra"})
    assert out["status"] == "FAILED" and "quality" in out["error"], out
    assert api_worker.runsync(IMAGE)["status"] == "COMPLETED"


# -- in process: the sampler, the model, the errors -------------------------------------------


def record_forwards(module: torch.nn.Module) -> tuple[list[dict], object]:
    calls: list[dict] = []

    def hook(_module, args, kwargs, output):
        calls.append(
            {
                "x": kwargs["hidden_states"].detach().clone(),
                "t": kwargs["timestep"].detach().clone(),
                "v": (output[0] if isinstance(output, tuple) else output.sample).detach().clone(),
            }
        )

    return calls, module.register_forward_hook(hook, with_kwargs=True)


def grid_sigma(t: int, shift: float = 8.0) -> float:
    """Independent of diffusers: FastVideo's nearest-timestep lookup on the shifted 1000-step grid."""
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    sigmas = shift * s / (1 + (shift - 1) * s)
    return float(sigmas[torch.argmin((sigmas * 1000 - t).abs())])


def test_dmd_steps_match_an_independent_loop(worker, monkeypatch):
    """x0 = x - sigma * v, then re-noise to the next sigma with the job's seeded generator."""
    turbo = worker.manager.pipeline("turbo")
    base_calls, base_hook = record_forwards(worker.manager.pipeline("t2v").transformer)
    calls, hook = record_forwards(turbo.transformer)
    decoded: list[torch.Tensor] = []
    original_decode = turbo.vae.decode
    monkeypatch.setattr(turbo.vae, "decode", lambda z, **kw: (decoded.append(z.clone()), original_decode(z, **kw))[1])
    try:
        out = handle(worker, {**VIDEO, "seed": 77})
    finally:
        hook.remove()
        base_hook.remove()
    assert out["status"] == "completed", out
    assert len(calls) == 3 and not base_calls  # one forward per step, on the distilled model only
    assert [int(c["t"][0]) for c in calls] == [1000, 757, 522]

    g = torch.Generator().manual_seed(77)
    x = torch.randn(calls[0]["x"].shape, generator=g, dtype=torch.float32)
    sigmas = [grid_sigma(t) for t in (1000, 757, 522)] + [0.0]
    for i, call in enumerate(calls):
        torch.testing.assert_close(call["x"].float(), x.to(call["x"].dtype).float(), atol=2e-2, rtol=2e-2)
        x0 = x.float() - sigmas[i] * call["v"].float()
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32) if sigmas[i + 1] > 0 else 0.0
        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
    cfg = turbo.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    (z,) = decoded
    torch.testing.assert_close((z.float() - mean) / std, x, atol=3e-2, rtol=3e-2)


def test_fewer_steps_run_a_prefix_and_more_are_refused(worker):
    calls, hook = record_forwards(worker.manager.pipeline("turbo").transformer)
    try:
        out = handle(worker, {**IMAGE, "config": {"num_inference_steps": 2, "guidance_scale": 5.0}})
    finally:
        hook.remove()
    assert out["status"] == "completed", out
    check_turbo_metadata(out["metadata"], steps=2)
    assert len(calls) == 2
    assert any("config.guidance_scale 5 ignored" in w for w in out["warnings"])
    refused = handle(worker, {**IMAGE, "config": {"num_inference_steps": 4}})
    assert refused["error_code"] == "invalid_input" and refused["field"] == "config.num_inference_steps"


def test_same_seed_same_bytes(worker):
    first, second = handle(worker, {**VIDEO, "seed": 9}), handle(worker, {**VIDEO, "seed": 9})
    assert asset_bytes(first) == asset_bytes(second)
    assert asset_bytes(handle(worker, {**VIDEO, "seed": 10})) != asset_bytes(first)


@pytest.mark.parametrize(
    "job",
    [
        {**VIDEO, "reference_image_url": png_data_uri()},
        {**VIDEO, "first_frame": png_data_uri(), "last_frame": png_data_uri()},
        {**IMAGE, "reference_image_url": png_data_uri()},  # image-to-image
    ],
)
def test_turbo_with_references_is_refused(worker, job):
    out = handle(worker, job)
    assert out["error_code"] == "invalid_input" and out["field"] == "quality", out
    assert "no distilled model" in out["error"]


def test_default_quality_applies_unless_the_job_says_otherwise():
    def quality(job: dict) -> tuple[str, list[str]]:
        built = build_job(parse_job_input(job), "j", default_quality="turbo")
        return built.quality, built.adjustments

    assert quality(SMALL_IMAGE)[0] == "turbo"
    assert quality({**SMALL_IMAGE, "quality": "high"})[0] == "high"
    applied, notes = quality({**SMALL_VIDEO, "reference_image_url": png_data_uri()})
    assert applied == "fast" and any("DEFAULT_QUALITY 'turbo'" in n for n in notes)
    assert build_job(parse_job_input(SMALL_IMAGE), "j").quality == "fast"


def test_unknown_quality_names_the_field(worker):
    out = handle(worker, {**IMAGE, "quality": "ultra"})
    assert out["error_code"] == "invalid_input" and out["field"] == "quality"


def test_residency_counts_the_turbo_transformer(tiny_models):
    """Under a budget too small for everything, the turbo job evicts the base transformer and
    the next standard job evicts the turbo one: both are accounted for. DEFAULT_QUALITY makes
    turbo the default; a job's own quality still wins."""
    worker = tiny_worker(tiny_models, inline_max_bytes=50_000_000, gpu_memory_budget_gb=0.5, default_quality="turbo")
    out = handle(worker, {**SMALL_IMAGE, "config": {}})
    assert out["status"] == "completed" and out["metadata"]["quality"] == "turbo", out
    manager = worker.manager
    turbo = manager.pipeline("turbo").transformer
    report = manager.memory_report()
    assert "turbo_transformer" in report["resident"] and "transformer" in report["offloaded"]
    assert manager._modules["turbo_transformer"].nbytes == module_bytes(turbo) > 0
    out = handle(worker, {**SMALL_IMAGE, "quality": "fast", "config": {"num_inference_steps": 1}})
    assert out["metadata"]["quality"] == "fast" and out["metadata"]["sampler"] == "unipc"
    report = manager.memory_report()
    assert "transformer" in report["resident"] and "turbo_transformer" in report["offloaded"]


def test_missing_turbo_checkpoint_fails_only_turbo_jobs(tiny_models):
    worker = tiny_worker(tiny_models, inline_max_bytes=50_000_000, turbo_model_id="FastVideo/not-downloaded")
    out = handle(worker, IMAGE)
    assert out["error_code"] == "model_unavailable" and out["retryable"] is False, out
    assert "builder/download_models.py" in out["error"] and "--only-turbo" in out["error"]
    assert handle(worker, {**SMALL_IMAGE, "config": {"num_inference_steps": 1}})["status"] == "completed"


def test_corrupt_turbo_weights_fail_turbo_jobs_only(tiny_models, tmp_path):
    other = tmp_path / TURBO_DIR
    shutil.copytree(tiny_models / TURBO_DIR, other)
    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    worker = tiny_worker(tiny_models, inline_max_bytes=50_000_000, turbo_model_id=str(other))
    out = handle(worker, IMAGE)
    assert out["error_code"] == "model_unavailable" and f"could not load {other}" in out["error"], out
    assert "--only-turbo" in out["error"] and not out.get("refresh_worker")
    assert handle(worker, {**SMALL_IMAGE, "config": {"num_inference_steps": 1}})["status"] == "completed"


def test_warm_up_loads_turbo_when_it_is_the_default(tiny_models, monkeypatch):
    from wan_worker.contract import settings as settings_module
    from wan_worker.serving import worker as worker_module

    monkeypatch.setenv("MODEL_PROFILE", "tiny")
    monkeypatch.setenv("TINY_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("WARMUP_ON_START", "1")
    monkeypatch.setenv("DEFAULT_QUALITY", "turbo")
    monkeypatch.setattr(worker_module, "_worker", None)
    settings_module.get_settings.cache_clear()
    try:
        worker_module.serverless_config()
        manager = worker_module.get_worker().manager
        assert manager.ready("t2v") and manager.ready("turbo")
    finally:
        settings_module.get_settings.cache_clear()
        monkeypatch.setattr(worker_module, "_worker", None)


def test_a_turbo_checkpoint_with_another_vae_is_refused(tiny_models, tmp_path):
    other = tmp_path / TURBO_DIR
    shutil.copytree(tiny_models / TURBO_DIR, other)
    config_path = other / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["base_dim"] = 96
    config_path.write_text(json.dumps(config))
    worker = tiny_worker(tiny_models, inline_max_bytes=50_000_000, turbo_model_id=str(other))
    out = handle(worker, IMAGE)
    assert out["error_code"] == "model_unavailable" and "vae" in out["error"] and "base_dim" in out["error"], out


def test_sparse_attention_gate_weights_are_skipped_and_logged_once(tiny_models, captured_logs):
    weights = tiny_models / TURBO_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        names = f.keys()
    gate_keys = [k for k in names if "to_gate_compress" in k]
    assert len(gate_keys) == 4  # weight and bias of each of the 2 blocks

    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")  # diffusers' own, not propagated
    seen: list[str] = []
    collector = logging.Handler(logging.WARNING)
    collector.emit = lambda record: seen.append(record.getMessage())
    diffusers_log.addHandler(collector)
    try:
        transformer = tiny_worker(tiny_models).manager.pipeline("turbo").transformer
    finally:
        diffusers_log.removeHandler(collector)
    assert not any("to_gate_compress" in name for name, _ in transformer.named_parameters())
    (record,) = [r for r in captured_logs.records() if "turbo checkpoint" in r.get("msg", "")]
    assert record["count"] == 4 and record["modules"] == ["attn1.to_gate_compress"]
    assert not [m for m in seen if "were not used when initializing" in m]  # one summary, not diffusers' key list
