"""Model loading: the full profile's lookup order and its error, on real on-disk checkpoints."""

from __future__ import annotations

import shutil

import pytest

from wan_worker.contract.errors import ModelUnavailable
from wan_worker.contract.settings import Settings
from wan_worker.runtime.models import ModelLocator, estimate_working_bytes
from wan_worker.runtime.tiny import T2V_DIR
from wan_worker.serving.worker import Worker


def test_full_profile_loads_from_models_dir(tiny_models, tmp_path):
    """The full profile's code path, pointed at a MODELS_DIR laid out like download_models.py."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models / T2V_DIR, models / T2V_DIR)
    settings = Settings(
        model_profile="full",
        models_dir=models,
        baked_models_dir=tmp_path / "none",
        hf_home=tmp_path / "hf",
        inline_max_bytes=50_000_000,
    )
    assert ModelLocator(settings).resolve("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == models / T2V_DIR
    out = Worker(settings).handle(
        {
            "id": "m1",
            "input": {
                "job_type": "image_fast",
                "prompt": "p",
                "width": 256,
                "height": 256,
                "config": {"num_inference_steps": 1},
            },
        },
        send=lambda p: None,
    )
    assert out["status"] == "completed", out


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(
        model_profile="full", models_dir=tmp_path / "empty", baked_models_dir=tmp_path / "none", hf_home=tmp_path / "hf"
    )
    with pytest.raises(ModelUnavailable) as info:
        ModelLocator(settings).resolve("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert "builder/download_models.py --models-dir" in info.value.message
    out = Worker(settings).handle({"id": "m2", "input": {"prompt": "p"}}, send=lambda p: None)
    assert out["error_code"] == "model_unavailable" and out["retryable"] is False


def test_working_memory_estimate_grows_with_tokens():
    small, full = estimate_working_bytes(480, 832, 17), estimate_working_bytes(480, 832, 81)
    assert full > small > estimate_working_bytes(256, 256, 1)


def test_warmup_on_start_loads_before_the_first_job(tiny_models, monkeypatch):
    from wan_worker.contract import settings as settings_module
    from wan_worker.serving import worker as worker_module

    monkeypatch.setenv("MODEL_PROFILE", "tiny")
    monkeypatch.setenv("TINY_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("WARMUP_ON_START", "1")
    monkeypatch.setenv("WARMUP_QWEN", "1")
    monkeypatch.setattr(worker_module, "_worker", None)
    settings_module.get_settings.cache_clear()
    try:
        config = worker_module.serverless_config()
        manager = worker_module.get_worker().manager
        assert manager.wan_loaded and manager.ready("t2v") and manager.qwen_loaded
        assert config["handler"] is worker_module.handler
    finally:
        settings_module.get_settings.cache_clear()
        monkeypatch.setattr(worker_module, "_worker", None)


@pytest.mark.parametrize("compiler", ["works", "fails"])
def test_fused_vae_norms_decode_like_diffusers(tiny_models, monkeypatch, compiler):
    """Each decoder norm that feeds a SiLU computes both, and its module's activation becomes
    the identity: the decode is unchanged (fp32, same latents). The encoder stays as it was.
    torch.compile is replaced by the plain function here (no C++ toolchain needed; the GPU
    benchmark runs the compiled one), or by one that fails, as a missing compiler would: the
    norms then run eagerly and the decode is still right."""
    import torch
    from diffusers import AutoencoderKLWan

    from wan_worker.runtime import patches
    from wan_worker.runtime.accel import compile_vae_norms

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(
        torch, "compile", (lambda fn, **kwargs: fn) if compiler == "works" else (lambda fn, **kwargs: broken)
    )
    errors: dict[str, str] = {}
    reference = AutoencoderKLWan.from_pretrained(tiny_models / T2V_DIR, subfolder="vae").eval()
    fused = AutoencoderKLWan.from_pretrained(tiny_models / T2V_DIR, subfolder="vae").eval()
    count = compile_vae_norms(fused, errors)
    blocks = [m for m in fused.decoder.modules() if type(m).__name__ == "WanResidualBlock"]
    assert count == 2 * len(blocks) + 1  # two per residual block, plus the decoder's head
    assert all(patches.has_hook(m.nonlinearity, patches.SILU_FUSED_AWAY) for m in blocks)
    assert not patches.has_hook(fused.encoder.nonlinearity, patches.SILU_FUSED_AWAY)
    latents = torch.randn(1, reference.config.z_dim, 5, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.decode(latents, return_dict=False)[0]
        got = fused.decode(latents, return_dict=False)[0]
    assert got.shape == expected.shape == (1, 3, 17, 96, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ("vae_norms" in errors) == (compiler == "fails")


def test_transformer_blocks_run_eagerly_when_compile_fails(tiny_models, monkeypatch):
    """torch.compile compiles at the first call, so a missing compiler shows up mid-job: the
    blocks then run their own forward, the output is unchanged, and the report says why."""
    import torch
    from diffusers import WanTransformer3DModel

    from wan_worker.runtime.accel import compile_blocks, transformer_dummy_inputs

    def failing_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor: no working C compiler")

        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    errors: dict[str, str] = {}
    transformer = WanTransformer3DModel.from_pretrained(tiny_models / T2V_DIR, subfolder="transformer").eval()
    inputs = transformer_dummy_inputs(transformer, 32, 32, 5, "cpu", text_len=8)
    inputs["hidden_states"] = inputs["hidden_states"].float()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].float()
    with torch.inference_mode():
        expected = transformer(**inputs)[0]
        assert compile_blocks(transformer, errors) == len(transformer.blocks)
        got = transformer(**inputs)[0]
    torch.testing.assert_close(got, expected)
    assert "no working C compiler" in errors["WanTransformer3DModel"]


def test_an_error_eager_code_raises_too_does_not_switch_compile_off():
    """EagerFallback only gives up on compile when the eager call succeeds where the compiled
    one failed; a genuine error propagates and compile stays on."""
    from wan_worker.runtime.accel import EagerFallback

    def compiled(x):
        raise RuntimeError("compiled failed")

    def eager(x):
        if x < 0:
            raise ValueError("bad input")
        return x * 2

    fallback = EagerFallback("unit")
    call = fallback.wrap(compiled, eager)
    with pytest.raises(ValueError, match="bad input"):
        call(-1)
    assert fallback.eager is False
    assert call(3) == 6 and fallback.eager is True
