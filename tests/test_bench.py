"""The benchmark harness's CPU smoke test: ``python -m benchmarks --tiny`` from the repository root.

No timing is asserted (CI machines differ); the test checks that every section ran the
real job path and reported sane, well-formed numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers.workers import ROOT

SECTIONS_THAT_RUN = (
    "write_models",
    "cold_start",
    "transformer",
    "vae",
    "reference",
    "worker",
    "cpu_stages",
    "qwen",
    "scaling",
)
GPU_ONLY = ("attention", "residency")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


def run_tiny_bench(tiny_models, tmp_path, *args: str) -> dict:
    """``python -m benchmarks --tiny`` on CPU, inline outputs; its JSON result."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--s3", "none", "--out", str(out)]
        + ["--work-dir", str(tmp_path / "work"), "--tiny-models-dir", str(tiny_models), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_bench_reports_every_stage(tiny_models, tmp_path):
    result = run_tiny_bench(tiny_models, tmp_path, "--x264-presets", "fast")
    assert result["mode"] == "tiny"
    assert result["versions"]["torch"] and result["versions"]["diffusers"]
    sections = result["sections"]
    for name in SECTIONS_THAT_RUN:
        assert name in sections, name
        assert "error" not in sections[name], (name, sections[name].get("error"), sections[name].get("traceback"))
    for name in GPU_ONLY:
        assert sections[name] == {"skipped": "needs CUDA", "section_seconds": sections[name]["section_seconds"]}

    cold = sections["cold_start"]
    assert positive(cold["imports_s"]) and cold["ready_s"] >= cold["worker_built_s"] >= cold["imports_s"]
    assert cold["load_seconds"].keys() == {"wan", "text_encoder"}
    assert cold["sdk_imported"] is True  # handler.py's order: the SDK before the worker
    assert cold["heavy_modules_at_import"] == [], cold["heavy_modules_at_import"]  # the worker's own imports
    recorded = cold["startup_files"]  # the first start leaves the list the next start reads ahead
    assert recorded["recorded"] and recorded["files"] > 100 and recorded["bytes"] > 0, recorded

    ref = sections["reference"]
    assert ref["steps"] == 2 and ref["frames_finite"] and ref["frames_shape"] == [9, 256, 256, 3]

    worker = sections["worker"]
    uncached = worker["uncached"]
    assert uncached["status"] == "completed", uncached
    assert uncached["steps"] == 2 and len(uncached["step_s"]) == 2 and all(positive(s) for s in uncached["step_s"])
    for key in ("total_s", "text_encoding_s", "denoising_s", "vae_decode_and_postprocess_s"):
        assert positive(uncached[key]), key
    assert uncached["total_s"] >= uncached["denoising_s"]
    assert set(uncached["worker_timings"]) >= {
        "text_encoding",
        "denoising",
        "vae_decode",
        "encoding",
        "uploading",
        "total",
    }
    assert uncached["step_cache"] == {"mode": "off", "threshold": None}
    # same weights, prompt and seed as plain diffusers: only the VAE precision differs
    assert uncached["psnr_vs_reference_db"] > 25
    cached = next(v for k, v in worker.items() if k.startswith("cached_"))
    assert cached["status"] == "completed" and cached["step_cache"]["mode"] == "on"
    assert cached["psnr_vs_uncached_db"] > 25

    cpu = sections["cpu_stages"]
    for clip in ("natural_clip/fast", "decoded_frames/fast"):
        assert cpu[clip]["mp4_bytes"] > 0 and positive(cpu[clip]["encode_s"]) and cpu[clip]["mp4_psnr_db"] > 25

    vae = sections["vae"]
    assert (
        vae["fp32"]["psnr_vs_fp32"] == float("inf")
        or vae["fp32"]["psnr_vs_fp32"] is None
        or vae["fp32"]["psnr_vs_fp32"] > 99
    )
    assert positive(vae["bf16"]["decode_s"]) and vae["bf16"]["psnr_vs_fp32"] > 20

    qwen = sections["qwen"]
    assert positive(qwen["configured"]["decode_tok_s"]) and positive(qwen["eager_dynamic"]["decode_tok_s"])
    assert qwen["prompt_tokens"] > 100

    rows = sections["scaling"]["rows"]
    assert [row["frames"] for row in rows] == [9, 17] and rows[1]["tokens"] > rows[0]["tokens"]
    assert all(0 < row["attention_flop_share"] < 1 for row in rows)

    summary = result["summary"]
    assert summary["1_video_fast_uncached_end_to_end_s"] == uncached["total_s"]
    assert summary["fidelity_psnr_vs_reference_db"] == uncached["psnr_vs_reference_db"]
    assert "residency_peak_gib" in summary and "qwen_decode_tok_s" in summary


def test_tiny_bench_turbo_and_throughput_sections(tiny_models, tmp_path):
    """The turbo and throughput sections (skipped by a plain ``--tiny``): distilled video and
    image jobs end to end through ``Worker.handle``, their stage times, and the ``video_fast`` run
    it compares with; then back-to-back jobs of each video kind on the same warm worker."""
    result = run_tiny_bench(tiny_models, tmp_path, "--sections", "turbo,throughput", "--throughput-jobs", "1")
    assert list(result["sections"]) == ["turbo", "throughput"]
    turbo = result["sections"]["turbo"]
    assert "error" not in turbo, turbo.get("traceback")
    for kind, frames in (("video", 9), ("image", 1)):
        row = turbo[kind]
        assert row["completed"] == row["runs"] == 1, row
        assert row["steps"] == 3 and row["shape"]["frames"] == frames  # turbo's distilled schedule
        assert positive(row["total_s"]) and row["total_s"] >= row["stages_s"]["denoising"] > 0
        assert {"text_encoding", "denoising", "vae_decode", "encoding", "uploading"} <= set(row["stages_s"])
    assert turbo["video_fast"]["status"] == "completed" and turbo["video_fast"]["source"] == "run here"
    assert turbo["speedup_vs_video_fast"] == round(turbo["video_fast"]["total_s"] / turbo["video"]["total_s"], 2)
    summary = result["summary"]
    assert summary["8_turbo_video_end_to_end_s"] == turbo["video"]["total_s"]
    assert summary["8_turbo_image_end_to_end_s"] == turbo["image"]["total_s"]

    throughput = result["sections"]["throughput"]
    assert "error" not in throughput, throughput.get("traceback")
    assert throughput["worker"] == "an earlier section's (warm)"  # the turbo section's worker, reused
    for kind in ("video_fast", "video_turbo"):
        row = throughput[kind]
        assert row["warm_up_job"]["status"] == "completed", row
        assert row["completed"] == row["runs"] == 1, row
        seconds, gpu, tail = row["seconds_per_job"], row["gpu_s"], row["cpu_tail_s"]
        assert positive(seconds) and positive(gpu) and positive(tail)
        assert abs(gpu + tail - seconds) < 0.01 and gpu > tail  # the decode is in the GPU part
        assert row["jobs_per_gpu_hour"] == round(3600 / seconds, 1)
        assert 1 < row["concurrency2_upper_bound"] == round(min(2.0, seconds / gpu), 3)
        assert set(row["cpu_tail_parts_s"]) == {"encoding", "uploading", "report"}
        assert row["cpu_tail_parts_s"]["encoding"] == row["stages_s"]["encoding"] > 0
        assert {"generating", "encoding", "uploading"} <= set(row["observer_stages_s"])
        both = row["concurrency2"]  # two jobs from two threads, as WORKER_CONCURRENCY=2 runs them
        assert both["completed"] == both["jobs"] == 2 and not both["errors"], both
        assert sum(wait > 0 for wait in both["waiting_for_gpu_s"]) == 1  # the GPU stages took turns
        assert row["concurrency2_gain"] == round(seconds / both["seconds_per_job"], 3)
    assert throughput["video_turbo"]["steps"] == 3 and throughput["video_fast"]["steps"] == 2
    assert summary["11_throughput_video_fast_s_per_job"] == throughput["video_fast"]["seconds_per_job"]
    assert (
        summary["11_throughput_video_turbo_concurrency2_upper_bound"]
        == (throughput["video_turbo"]["concurrency2_upper_bound"])
    )
    assert summary["11_throughput_video_turbo_concurrency2_gain"] == throughput["video_turbo"]["concurrency2_gain"]
