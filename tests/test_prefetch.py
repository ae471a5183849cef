"""The start-up prefetch reads exactly the checkpoints the warm-up loads, and nothing when off."""

from __future__ import annotations

import time

from wan_worker import prefetch
from wan_worker.settings import Settings


def checkpoint(root, name: str, sizes: dict[str, int]):
    directory = root / name
    for rel, size in sizes.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(bytes(range(256)) * (size // 256))
    (directory / "model_index.json").write_text("{}")
    return directory


def settings(tmp_path, **overrides) -> Settings:
    return Settings(model_profile="full", models_dir=tmp_path, baked_models_dir=tmp_path / "none", **overrides)


def wait(job: prefetch.Prefetch) -> dict:
    deadline = time.monotonic() + 30
    while not job.report()["done"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return job.report()


def test_reads_every_weight_file_of_the_start_up_models(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "CHUNK_BYTES", 4096)  # many chunks across the reader threads
    checkpoint(
        tmp_path,
        "Wan2.1-T2V-1.3B-Diffusers",
        {"transformer/a.safetensors": 40960, "vae/b.safetensors": 5120, "tokenizer/spiece.model": 2560},
    )
    checkpoint(tmp_path, "FastWan2.1-T2V-1.3B-Diffusers", {"transformer/c.safetensors": 10240})
    checkpoint(tmp_path, "Qwen2.5-7B", {"model.safetensors": 2560})

    report = wait(prefetch.prefetch_on_start(settings(tmp_path, default_quality="turbo")))
    assert report["done"] and report["files"] == 3 and not report["errors"]
    assert report["bytes_read"] == report["bytes"] == 40960 + 5120 + 10240

    job = prefetch.prefetch_on_start(settings(tmp_path, warmup_qwen=True))
    assert [p.name for p in job.files] == ["a.safetensors", "b.safetensors", "model.safetensors"]
    assert wait(job)["done"]


def test_off_tiny_without_warm_up_or_without_weights_does_nothing(tmp_path):
    checkpoint(tmp_path, "Wan2.1-T2V-1.3B-Diffusers", {"transformer/a.safetensors": 4096})
    assert prefetch.prefetch_on_start(settings(tmp_path, prefetch_weights=False)) is None
    assert prefetch.prefetch_on_start(settings(tmp_path, warmup_on_start=False)) is None
    assert prefetch.prefetch_on_start(settings(tmp_path / "empty")) is None  # the load reports it
    assert prefetch.prefetch_on_start(Settings(model_profile="tiny", tiny_models_dir=tmp_path)) is None


def test_reads_at_most_half_the_memory_in_load_order(tmp_path, monkeypatch):
    checkpoint(
        tmp_path,
        "Wan2.1-T2V-1.3B-Diffusers",
        {"text_encoder/a.safetensors": 4096, "transformer/b.safetensors": 4096, "vae/c.safetensors": 4096},
    )
    monkeypatch.setattr(prefetch, "memory_bytes", lambda: 2 * 9000)
    job = prefetch.prefetch_on_start(settings(tmp_path))
    assert [p.parent.name for p in job.files] == ["text_encoder", "transformer"]
    assert wait(job)["bytes_read"] == 8192


def test_an_unreadable_file_is_reported_not_raised(tmp_path):
    good = checkpoint(tmp_path, "m", {"a.safetensors": 4096}) / "a.safetensors"
    gone = tmp_path / "gone.safetensors"  # listed, then removed before the read
    report = wait(prefetch.Prefetch([good, gone], threads=2).start())
    assert report["done"] and report["bytes_read"] == 4096
    assert report["errors"] == ["gone.safetensors: No such file or directory"]
