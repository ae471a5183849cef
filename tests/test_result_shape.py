"""The job result's shape: keys and their order, for a video, a long video, a turbo and an
enhanced job. The lists were recorded from the worker before its stages were split into
typed hand-offs; a change here changes what every caller parses."""

from __future__ import annotations

import pytest
from helpers.inprocess import SMALL_VIDEO, handle, tiny_worker

from wan_worker.stages.observer import JobObserver

TOP = ["status", "job_id", "assets", "metadata", "warnings"]
ASSET = [
    "width", "height", "frames", "fps", "duration_seconds", "file_size_bytes", "format", "seed", "pipeline",
    "reference_mode_requested", "reference_mode_applied", "denoise_strength", "conditioning_scale",
    "resize_policy", "conditioning", "loras_applied",
]  # fmt: skip
SINGLE = [
    "job_type", "quality", "steps", "scheduler_steps", "guidance_scale", "flow_shift", "sampler", "timesteps",
    "model", "sampling_sources", "seed", "seed_source", "negative_prompt", "prompt", "step_cache",
    "denoise_source", "quality_degraded", "timings", "total_seconds", "peak_vram_gib", "worker",
]  # fmt: skip
ENHANCED = [
    "original_prompt", "enhanced_prompt", "enhancement_applied", "enhancement_source", "enhancement_time",
    "enhancement_cache_hit", "enhancement_reason",
]  # fmt: skip
LONG = [
    "job_type", "quality", "steps", "scheduler_steps", "guidance_scale", "flow_shift", "seed", "seed_source",
    "negative_prompt", "prompt", "step_cache", "denoise_source", "quality_degraded", "timings", "total_seconds",
    "peak_vram_gib", "worker", "frames_requested", "length_field", "overlap_frames", "segment_frames_max",
    "estimated_seconds", "segments", "seams", "max_seam_ratio", "enhancement_applied",
]  # fmt: skip
SEGMENT = [
    "index", "frames", "kept_frames", "new_frames", "pipeline", "quality", "steps", "seed", "prompt_sha256",
    "prompt_source", "step_cache_threshold", "timings",
]  # fmt: skip
SINGLE_TIMINGS = ["validating", "loading", "text_encoding", "denoising", "vae_decode", "encoding", "uploading", "total"]
LONG_TIMINGS = ["validating", "loading", "text_encoding", "denoising", "vae_decode", "stitching", "uploading", "total"]


@pytest.fixture(scope="module")
def worker(tiny_models):
    return tiny_worker(tiny_models, inline_max_bytes=50_000_000, segment_frames=5, single_pass_max_frames=5)


def check(out: dict, meta_keys: list[str]) -> dict:
    assert out["status"] == "completed", out
    assert list(out) == TOP
    assert list(out["assets"][0]["metadata"]) == ASSET
    assert list(out["metadata"]) == meta_keys
    return out["metadata"]


def test_video_turbo_and_enhanced_results_keep_their_keys(worker):
    video = {**SMALL_VIDEO, "frame_num": 1}  # the keys don't depend on the length; decoding does
    meta = check(handle(worker, video, job_id="shape-video"), [*SINGLE, "enhancement_applied"])
    assert list(meta["timings"]) == SINGLE_TIMINGS
    assert meta["step_cache"] == {"mode": "auto", "threshold": meta["step_cache"]["threshold"]}
    meta = check(handle(worker, {**video, "quality": "turbo", "config": {}}), [*SINGLE, "enhancement_applied"])
    assert list(meta["timings"]) == SINGLE_TIMINGS
    meta = check(handle(worker, {**video, "enhance_prompt": True}), [*SINGLE, *ENHANCED])
    assert list(meta["timings"]) == ["validating", "enhancing", *SINGLE_TIMINGS[2:]]


def test_long_video_result_keeps_its_keys(worker):
    job = {**SMALL_VIDEO, "frame_num": 7, "overlap_frames": 4, "config": {"num_inference_steps": 1}}
    meta = check(handle(worker, job, job_id="shape-long"), LONG)
    assert [k for k in meta["timings"] if k != "loading"] == [k for k in LONG_TIMINGS if k != "loading"]
    assert len(meta["segments"]) > 1 and all(list(s) == SEGMENT for s in meta["segments"])


def test_a_rejected_job_keeps_its_keys(worker):
    out = handle(worker, {"job_type": "nope", "prompt": "x"})
    assert list(out) == ["error", "error_code", "retryable", "field", "details", "job_id"]


class Recorder(JobObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stage_started(self, name: str) -> None:
        self.events.append(("stage", name))

    def text_encoded(self) -> None:
        self.events.append(("text_encoded",))

    def step_finished(self, step: int, total: int) -> None:
        self.events.append(("step", step, total))

    def frames_decoded(self, frames) -> None:
        self.events.append(("frames", frames.shape))


def test_an_observer_sees_stages_steps_and_frames_in_order(worker):
    """The benchmark's seam: every stage, the end of text encoding, each step, the decoded frames."""
    recorder = Recorder()
    sent: list[dict] = []
    out = worker.handle({"id": "observed", "input": SMALL_VIDEO}, send=sent.append, observer=recorder)
    assert out["status"] == "completed", out
    generating = recorder.events.index(("stage", "generating"))
    assert recorder.events[0] == ("stage", "validating")
    assert recorder.events[generating + 1 :] == [
        ("text_encoded",),
        ("step", 1, 2),
        ("step", 2, 2),
        ("frames", (5, 256, 256, 3)),
        ("stage", "encoding"),
        ("stage", "uploading"),
    ]
    # the observer sees what progress reports, and more (steps are not throttled for it)
    assert [p["stage"] for p in sent if not p.get("step")] == [e[1] for e in recorder.events if e[0] == "stage"]
