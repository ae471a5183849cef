"""Prompt enhancement with a tiny Qwen2 saved and loaded through the real path.

The base checkpoint is trained for a few seconds to complete one prompt, so the applied
path is exercised by a real model; the random checkpoint exercises the fallbacks.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from wan_worker.contract.settings import Settings
from wan_worker.runtime.tiny import QWEN_BASE_DIR, QWEN_INSTRUCT_DIR
from wan_worker.serving.worker import Worker
from wan_worker.stages import enhance as E

TARGET = "A fluffy orange cat naps on a sunny windowsill, tail swaying slowly, soft light, smooth motion."
SMALL = {"width": 256, "height": 256, "config": {"num_inference_steps": 1}}


@pytest.fixture(scope="session")
def trained_qwen(tiny_models, tmp_path_factory) -> Path:
    """The tiny base Qwen, taught to enhance "a cat" into TARGET (then saved for real)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("qwen") / "trained"
    shutil.copytree(tiny_models / QWEN_BASE_DIR, path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = E.completion_prompt("a cat", "video_fast", "fast")
    ids = tok(prompt + " " + TARGET + E.DELIMITER, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : tok(prompt, return_tensors="pt").input_ids.shape[1]] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.save_pretrained(path)
    return path


def make_worker(tiny_models: Path, qwen: Path | str, **overrides) -> Worker:
    return Worker(
        Settings(
            model_profile="tiny",
            tiny_models_dir=tiny_models,
            qwen_model=str(qwen),
            inline_max_bytes=50_000_000,
            **overrides,
        )
    )


def run(worker: Worker, job_input: dict) -> dict:
    return worker.handle({"id": "enh", "input": job_input}, send=lambda payload: None)


def test_completion_prompt_format():
    video = E.completion_prompt("  a dog  ", "video7b_fast_enhanced", "fast")
    image = E.completion_prompt("a dog", "image7b_high_enhanced", "high")
    assert video.endswith("Prompt: a dog\nEnhanced prompt:")
    assert "WAN 2.1 video generation" in video and "MOTION FIRST" in video and "about 150 tokens" in video
    assert "still image" in image and "about 250 tokens" in image and "MOTION FIRST" not in image
    assert video.count(E.DELIMITER) == len(E.EXAMPLES) + 1


def test_clean_completion_strips_leftovers():
    assert E.clean_completion(' "A cat sleeps."\n###\nPrompt: x') == "A cat sleeps."
    assert E.clean_completion("A cat sleeps. Then it wak") == "A cat sleeps."
    assert E.clean_completion("A cat\nPrompt: next one") == "A cat"


def test_enhanced_job_uses_the_model_and_decodes_only_new_tokens(tiny_models, trained_qwen):
    worker = make_worker(tiny_models, trained_qwen)
    out = run(worker, {"job_type": "video7b_fast_enhanced", "prompt": "a cat", "frame_num": 5, **SMALL})
    meta = out["metadata"]
    assert meta["enhancement_applied"] is True, meta
    assert meta["enhanced_prompt"] == TARGET and meta["prompt"] == TARGET
    assert meta["original_prompt"] == "a cat" and meta["enhancement_source"] == "qwen_base"
    assert meta["enhancement_time"] > 0 and meta["timings"]["enhancing"] > 0
    assert worker.manager.qwen_loaded

    again = run(worker, {"job_type": "video7b_fast_enhanced", "prompt": "a cat", "frame_num": 5, **SMALL})
    assert again["metadata"]["enhancement_cache_hit"] is True and again["metadata"]["enhanced_prompt"] == TARGET
    other_quality = worker.enhancer.enhance("a cat", "video7b_fast_enhanced", "high")
    assert other_quality.cache_hit is False  # the key includes quality
    assert worker.enhancer.cache_hits == 1

    # generation stopped at the delimiter, far short of ENHANCE_MAX_NEW_TOKENS
    fresh = make_worker(tiny_models, trained_qwen).enhancer.enhance("a cat", "video_fast", "fast")
    _model, tokenizer = worker.manager.qwen()
    expected = len(tokenizer(" " + TARGET + E.DELIMITER).input_ids)
    assert fresh.enhanced_prompt == TARGET and expected - 3 <= fresh.new_tokens <= expected + 1


def test_enhance_action_returns_the_endpoint_fields(tiny_models, trained_qwen):
    worker = make_worker(tiny_models, trained_qwen)
    out = run(worker, {"action": "enhance", "prompt": "a cat", "model": "qwen_base"})
    assert out["success"] is True and out["enhanced_prompt"] == TARGET
    assert out["original_prompt"] == "a cat" and out["worker"] == "wan" and out["model"] == "qwen_base"
    assert out["enhancement_applied"] is True and out["model_was_loaded"] is False
    assert out["processing_time"] >= 0 and out["enhancement_source"] == "qwen_base"
    assert run(worker, {"action": "enhance", "prompt": "a cat"})["model_was_loaded"] is True
    assert run(worker, {"action": "enhance"})["error_code"] == "invalid_input"


def test_random_model_output_falls_back_with_reason(tiny_models):
    worker = make_worker(tiny_models, tiny_models / QWEN_BASE_DIR)
    out = run(worker, {"job_type": "image7b_fast_enhanced", "prompt": "a lighthouse at dusk", **SMALL})
    meta = out["metadata"]
    assert out["status"] == "completed"
    assert meta["enhancement_applied"] is False and meta["enhancement_reason"]
    assert meta["prompt"] == "a lighthouse at dusk" and meta["enhancement_source"] == "original"
    assert any("prompt enhancement not applied" in w for w in out["warnings"])


def test_time_bound_is_real(tiny_models, trained_qwen):
    """A model that really sleeps 0.3 s per token is stopped by max_time, in this thread."""
    worker = make_worker(tiny_models, trained_qwen, enhance_timeout_s=1.0, enhance_cache_size=0)
    model, _ = worker.manager.qwen()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.3)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    started = time.perf_counter()
    result = worker.enhancer.enhance("a cat", "video_fast", "fast")
    elapsed = time.perf_counter() - started
    assert result.enhancement_applied is False and result.reason.startswith("timeout")
    assert result.enhanced_prompt == "a cat"
    assert elapsed < 1.0 + 0.3 + 0.5


def test_refusal_like_output_falls_back(tiny_models, trained_qwen, monkeypatch):
    worker = make_worker(tiny_models, trained_qwen)
    monkeypatch.setattr(E, "clean_completion", lambda text: "I'm sorry, I can't help with that request.")
    result = worker.enhancer.enhance("a cat", "video_fast", "fast")
    assert result.enhancement_applied is False and result.reason == "refusal-like output"


def test_instruct_checkpoint_uses_its_chat_template(tiny_models, tmp_path):
    instruct = tmp_path / "Qwen2.5-7B-Instruct"
    shutil.copytree(tiny_models / QWEN_INSTRUCT_DIR, instruct)
    worker = make_worker(tiny_models, instruct)
    model, tok = worker.manager.qwen()
    seen = []
    generate = model.generate
    model.generate = lambda **kw: seen.append(tok.decode(kw["input_ids"][0])) or generate(**kw)
    worker.enhancer.enhance("a cat", "video_fast", "fast")
    assert seen[0].startswith("<|im_start|>system\nYou are an expert")
    assert seen[0].endswith("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n")


def test_residency_moves_models_under_a_budget(tiny_models, trained_qwen):
    worker = make_worker(tiny_models, trained_qwen)
    manager = worker.manager
    run(worker, {"job_type": "image_fast", "prompt": "a cat", **SMALL})
    assert not manager.qwen_loaded  # loaded lazily, by the first enhanced job
    run(worker, {"job_type": "image7b_fast_enhanced", "prompt": "a cat", **SMALL})
    assert manager.qwen_loaded and manager._modules["qwen"].on_device
    wan_bytes = sum(manager._modules[n].nbytes for n in ("text_encoder", "transformer", "vae"))
    qwen_bytes = manager._modules["qwen"].nbytes
    # A budget that holds WAN or Qwen, not both: each stage must evict the other's modules.
    manager.budget_bytes = max(wan_bytes, qwen_bytes) + min(wan_bytes, qwen_bytes) // 2
    manager.moves.clear()
    manager.acquire(["qwen"], working_bytes=0)
    assert {m.module for m in manager.moves if m.to == "cpu"} & {"text_encoder", "transformer", "vae"}
    assert manager.resident_bytes() <= manager.budget_bytes
    manager.moves.clear()
    manager.acquire(["text_encoder", "transformer", "vae"], working_bytes=0)
    moves = [(m.module, m.to) for m in manager.moves]
    assert ("qwen", "cpu") in moves  # offloaded to host memory, not dropped
    assert all(manager._modules[n].on_device for n in ("text_encoder", "transformer", "vae"))
    assert manager.qwen_loaded and "qwen" in manager.memory_report()["offloaded"]
    manager.acquire(["qwen"], working_bytes=0)
    assert manager._modules["qwen"].on_device  # and it comes back when needed


def test_health_and_debug_env_never_leak(tiny_models, monkeypatch):
    secrets = {
        "BUCKET_SECRET_ACCESS_KEY": "s3-secret-value-xyz",
        "CALLBACK_SECRET": "cb-secret-value-xyz",
        "HF_TOKEN": "hf_tokenvalue123456",
        "RUNPOD_AI_API_KEY": "rp-api-key-987654",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    worker = make_worker(tiny_models, tiny_models / QWEN_BASE_DIR)
    debug = run(worker, {"action": "debug_env"})
    assert all(debug["env_set"][k] is True for k in secrets)
    assert debug["env_set"]["BUCKET_ENDPOINT_URL"] is False
    text = repr(debug)
    for value in secrets.values():
        assert value not in text and value[:6] not in text
    health = run(worker, {"action": "health"})
    for key in (
        "status",
        "qwen_loaded",
        "wan_loaded",
        "worker_ready",
        "timestamp",
        "gpu_memory_used_gib",
        "gpu_memory_free_gib",
    ):
        assert key in health
    assert health["status"] == "healthy" and health["worker_ready"] is True


def test_deferred_stop_check_is_enabled_for_cuda_only():
    """transformers reads the stop flag one step late on CUDA once enabled; CPU is unchanged."""
    from transformers.generation.utils import DeferredStopCheck

    from wan_worker.runtime.patches import defer_stop_check_on_cuda

    assert defer_stop_check_on_cuda() and defer_stop_check_on_cuda()  # idempotent
    assert DeferredStopCheck.is_supported(torch.device("cuda"), None, False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(torch.device("cuda"), None, False, is_assistant=True)
    assert not DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=False)
