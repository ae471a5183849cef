"""Long videos: the segment plan, stitching, and real multi-segment jobs on the tiny models.

Jobs run through ``Worker.handle`` (in process, the real pipelines wrapped to record what
they receive and return) and through ``handler.py --test_input``. Segments are kept tiny
(SEGMENT_FRAMES=5 with 4 kept frames, one step, no guidance) so that a three-segment job
stays cheap on a CPU.
"""

from __future__ import annotations

import base64
import hashlib
import time

import numpy as np
import pytest
import requests
import torch
from diffusers import WanPipeline, WanVACEPipeline
from helpers.inprocess import handle, png_data_uri, tiny_worker
from helpers.mediacheck import probe_video
from helpers.workers import run_test_input, worker_env

from wan_worker.serving.long_video import LongVideo
from wan_worker.stages.generate import DecodedFrames
from wan_worker.stages.media import to_uint8
from wan_worker.stages.segments import MIN_NEW_FRAMES, CostModel, plan_segments
from wan_worker.stages.stitch import SeamMeter, crossfade, match_colour

LONG = {"segment_frames": 5, "single_pass_max_frames": 5, "inline_max_bytes": 50_000_000}
BASE = {
    "job_type": "video_fast",
    "prompt": "a ball rolls",
    "width": 256,
    "height": 256,
    "fps": 12,
    "seed": 3,
    "overlap_frames": 4,
    "config": {"num_inference_steps": 1, "guidance_scale": 1.0},
}
RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture(scope="module")
def worker(tiny_models):
    # The up-front estimate learns step costs from this module's earlier jobs; on a busy CI
    # machine those can make a 25-step continuation look longer than the default 900 s.
    return tiny_worker(tiny_models, job_timeout_s=3600, **LONG)


@pytest.fixture
def calls(monkeypatch, worker):
    """What each real pipeline receives, the frames the worker decoded from it (float in
    [0, 1]), and the prompt each generation encodes."""
    recorded: list[dict] = []
    for cls in (WanPipeline, WanVACEPipeline):
        original = cls.__call__

        def spy(self, *args, _original=original, _name=cls.__name__, **kwargs):
            result = _original(self, *args, **kwargs)
            recorded.append({"name": _name, "kwargs": kwargs})
            return result

        monkeypatch.setattr(cls, "__call__", spy)
    decoded = DecodedFrames.frames

    def frames_spy(self, output):
        frames = decoded(self, output)
        recorded[-1]["frames"] = frames.astype(np.float32) / 255.0
        return frames

    monkeypatch.setattr(DecodedFrames, "frames", frames_spy)
    prompts: list[str] = []
    encode = worker.generator.encode_prompt

    def encode_spy(job, prompt):
        prompts.append(prompt)
        return encode(job, prompt)

    monkeypatch.setattr(worker.generator, "encode_prompt", encode_spy)
    return recorded, prompts


def video_bytes(out: dict) -> bytes:
    return base64.b64decode(out["assets"][0]["url"].split(",", 1)[1])


def kept_frames(kwargs: dict) -> list[int]:
    return [i for i, m in enumerate(kwargs["mask"]) if m.getpixel((0, 0)) == (0, 0, 0)]


def is_color(image, rgb, tol=40) -> bool:
    return bool(np.all(np.abs(np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0) - rgb) < tol))


# -- the plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_frames", [9, 17, 33, 81])
def test_plan_makes_exactly_the_requested_frames(max_frames):
    for overlap in range(4, 41):
        for total in range(max_frames + 1, 24 * 60 + 2, 11 if max_frames < 81 else 5):
            if max_frames < overlap + 1 + (-overlap) % 4:  # no room for K + 1 frames on the 4k+1 grid
                with pytest.raises(ValueError):
                    plan_segments(total, overlap, max_frames)
                break
            plan = plan_segments(total, overlap, max_frames)
            assert sum(s.new for s in plan) == total
            assert len(plan) >= 2 and plan[0].kept == 0
            assert [s.index for s in plan] == list(range(len(plan)))
            assert all(s.frames % 4 == 1 and s.frames <= max_frames for s in plan)
            assert all(s.kept == overlap for s in plan[1:-1])
            assert overlap <= plan[-1].kept <= overlap + 3 and plan[-1].new >= MIN_NEW_FRAMES
            assert plan[-1].frames <= plan[0].frames  # the last segment is never the longest
            # Fewest segments: one less, all full length, cannot hold the clip.
            assert max_frames + (len(plan) - 2) * (max_frames - overlap) < total


def test_plan_examples():
    assert [(s.frames, s.kept) for s in plan_segments(122, 16, 81)] == [(69, 0), (69, 16)]
    assert [(s.frames, s.kept) for s in plan_segments(18, 4, 9)] == [(9, 0), (9, 4), (9, 5)]
    assert plan_segments(81, 16, 81)[0].frames == 81  # one pass when it fits


def test_cost_model_prefers_measured_costs():
    costs = CostModel("cpu", "tiny")
    default = costs.seconds("t2v", 256, 256, 81, 10)
    costs.record("t2v", 256, 256, 81, 10, {"denoising": 21 * 256 * 10 * 1e-3, "vae_decode": 0.0})
    assert costs.step_cost("t2v") == pytest.approx(1e-3)
    assert costs.step_cost("vace") == pytest.approx(1.5e-3)  # VACE unmeasured: t2v x VACE_COST_FACTOR
    assert costs.seconds("t2v", 256, 256, 81, 10) > default


# -- stitching ---------------------------------------------------------------------------------


def test_match_colour_maps_overlap_statistics_onto_the_kept_frames():
    rng = np.random.default_rng(0)
    kept = rng.integers(40, 200, size=(4, 8, 8, 3), dtype=np.uint8)
    drifted = (kept.astype(np.float32) / 255.0) * np.float32(0.8) + np.float32([0.1, 0.0, 0.05])
    frames = np.concatenate([drifted, rng.random((5, 8, 8, 3), dtype=np.float32)])
    match_colour(frames, kept)
    target = kept.reshape(-1, 3) / 255.0
    got = frames[:4].reshape(-1, 3)
    np.testing.assert_allclose(got.mean(0), target.mean(0), atol=2e-3)
    np.testing.assert_allclose(got.std(0), target.std(0), atol=2e-3)
    assert frames.min() >= 0.0 and frames.max() <= 1.0


def test_crossfade_moves_linearly_from_kept_to_new():
    kept = np.zeros((3, 2, 2, 3), np.uint8)
    head = np.ones((3, 2, 2, 3), np.float32)
    np.testing.assert_allclose(crossfade(kept, head)[:, 0, 0, 0], [0.25, 0.5, 0.75])


def clip(jump: float, frames: int = 24, seam: int = 12) -> np.ndarray:
    ramp = np.linspace(0.2, 0.4, frames, dtype=np.float32)
    ramp[seam:] += jump
    return to_uint8(np.broadcast_to(ramp[:, None, None, None], (frames, 4, 4, 3)).copy())


def test_seam_meter_flags_a_jump_and_not_a_smooth_join():
    smooth, cut = SeamMeter(), SeamMeter()
    for meter, frames in ((smooth, clip(0.0)), (cut, clip(0.3))):
        meter.add(frames[:12])
        meter.mark_seam(12, 4)
        meter.add(frames[12:])
    assert smooth.report()[1] < 3.0
    seams, ratio = cut.report()
    assert ratio > 3.0 and seams[0]["frame"] == 12 and seams[0]["overlap"] == 4


def test_colour_match_and_crossfade_remove_a_colour_jump():
    """Two segments whose overlap shows the same content 0.25 brighter: stitched, no seam."""
    base = np.linspace(0.2, 0.5, 20, dtype=np.float32)
    first = np.broadcast_to(base[:12, None, None, None], (12, 4, 4, 3)).copy()
    second = np.broadcast_to(base[8:, None, None, None] + 0.25, (12, 4, 4, 3)).copy()
    naive, stitched = SeamMeter(), SeamMeter()
    naive.add(to_uint8(first[:8]))
    naive.mark_seam(8, 4)
    naive.add(to_uint8(second))
    kept = to_uint8(first[8:])
    match_colour(second, kept)
    second[:4] = crossfade(kept, second[:4])
    stitched.add(to_uint8(first[:8]))
    stitched.mark_seam(8, 4)
    stitched.add(to_uint8(second))
    assert naive.report()[1] > 3.0 > stitched.report()[1]


def test_video_stream_appends_segments_into_one_mp4(tmp_path):
    from wan_worker.stages.media import VideoStream

    stream = VideoStream(tmp_path / "0.mp4", 12)
    for shade in (0.2, 0.5, 0.8):  # float segments and uint8 ones alike
        stream.append(np.full((4, 64, 64, 3), shade, np.float32))
    stream.append(np.full((2, 64, 64, 3), 255, np.uint8))
    stream.close()
    info = probe_video((tmp_path / "0.mp4").read_bytes(), tmp_path)
    assert (stream.frames, info.frames, info.fps, info.faststart) == (14, 14, 12.0, True)


# -- jobs --------------------------------------------------------------------------------------


def test_three_segments_continue_each_other(worker, calls, tmp_path, captured_logs, monkeypatch):
    """7 frames in segments of 5: kept frames are the previous segment's decoded output."""
    monkeypatch.setattr("wan_worker.serving.long_video.SEAM_JUMP_RATIO", 0.0)  # any seam counts: the flag's plumbing
    recorded, prompts = calls
    progress: list[dict] = []
    job = {**BASE, "frame_num": 7, "segment_prompts": ["shot one", "shot two"]}
    out = handle(worker, job, progress=progress)
    assert out["status"] == "completed", out
    meta, asset = out["metadata"], out["assets"][0]["metadata"]
    assert asset["frames"] == 7 and asset["fps"] == 12 and asset["duration_seconds"] == round(7 / 12, 4)
    info = probe_video(video_bytes(out), tmp_path)
    assert (info.frames, info.fps, info.codec, info.faststart) == (7, 12.0, "h264", True)

    assert [c["name"] for c in recorded] == ["WanPipeline", "WanVACEPipeline", "WanVACEPipeline"]
    assert [c["kwargs"]["num_frames"] for c in recorded] == [5, 5, 5]
    assert [(s["frames"], s["kept_frames"], s["pipeline"]) for s in meta["segments"]] == [
        (5, 0, "t2v"),
        (5, 4, "vace"),
        (5, 4, "vace"),
    ]
    # Segment 2 keeps segment 1's last 4 decoded frames, exactly.
    second = recorded[1]["kwargs"]
    assert kept_frames(second) == [0, 1, 2, 3]
    first_out = to_uint8(recorded[0]["frames"])
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(second["video"][i]), first_out[1 + i])
    assert is_color(second["video"][4], (128, 128, 128), 1)
    # Segment 3 keeps segment 2's last 4 frames as stitched: colour-matched to the frames it
    # kept, and (3 of them) crossfaded from them.
    third = recorded[2]["kwargs"]
    assert kept_frames(third) == [0, 1, 2, 3]
    stitched = match_colour(recorded[1]["frames"].astype(np.float32), first_out[1:])
    stitched[:4] = crossfade(first_out[1:], stitched[:4])
    stitched = to_uint8(stitched)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(third["video"][i]), stitched[1 + i])

    # Storyboard: segment prompts in order, the main prompt where none is given.
    assert prompts == ["shot one", "shot two", "a ball rolls"]
    assert [s["prompt_sha256"] for s in meta["segments"]] == [
        hashlib.sha256(p.encode()).hexdigest()[:16] for p in prompts
    ]
    assert [s["seed"] for s in meta["segments"]] == [3, 4, 5]
    assert all({"denoising", "vae_decode", "stitching"} <= set(s["timings"]) for s in meta["segments"])
    assert [s["frame"] for s in meta["seams"]] == [1, 2]
    assert meta["max_seam_ratio"] == max(s["ratio"] for s in meta["seams"])
    assert meta["frames_requested"] == 7 and meta["overlap_frames"] == 4

    (line,) = captured_logs.events("job_metrics")
    assert "seam_jump" in line["flags"]

    steps = [p for p in progress if p.get("step")]
    assert {p["segment"] for p in steps} == {1, 2, 3} and {p["segments"] for p in steps} == {3}
    assert all(p["job_eta_seconds"] >= p["eta_seconds"] for p in steps)
    assert [p["percentage"] for p in steps] == sorted(p["percentage"] for p in steps)


def test_turbo_long_video_continues_with_vace_at_fast(worker, calls):
    """Turbo makes segment 1 on its distilled transformer; the continuations have no distilled
    model, so they run VACE at ``fast`` (UniPC with CFG), and the metadata says so."""
    recorded, _ = calls
    job = {**BASE, "frame_num": 7, "quality": "turbo", "config": {"num_inference_steps": 1}}
    out = handle(worker, job)
    assert out["status"] == "completed", out
    segments = out["metadata"]["segments"]
    assert [(s["pipeline"], s["quality"]) for s in segments] == [("turbo", "turbo"), ("vace", "fast"), ("vace", "fast")]
    assert [s["steps"] for s in segments] == [1, 25, 25]
    assert [c["kwargs"]["guidance_scale"] for c in recorded] == [1.0, 6.5, 6.5]
    assert out["assets"][0]["metadata"]["frames"] == 7


@pytest.mark.parametrize(
    "mode, fields, kept_first, kept_last",
    [
        ("both", {"first_frame": RED, "last_frame": BLUE}, [0], [0, 1, 2, 3, 4]),
        ("single", {"reference_image_url": RED}, None, [0, 1, 2, 3]),
    ],
)
def test_references_apply_to_the_right_segments(worker, calls, mode, fields, kept_first, kept_last):
    recorded, _ = calls
    job = {**BASE, "frame_num": 6, **{k: png_data_uri((64, 64), v) for k, v in fields.items()}}
    out = handle(worker, job)
    assert out["status"] == "completed", out
    assert out["assets"][0]["metadata"]["reference_mode_applied"] == mode
    first, last = (c["kwargs"] for c in recorded)
    assert [c["name"] for c in recorded] == ["WanVACEPipeline", "WanVACEPipeline"]
    if mode == "both":
        assert kept_frames(first) == kept_first and is_color(first["video"][0], RED)
        assert kept_frames(last) == kept_last and is_color(last["video"][-1], BLUE)
        assert "reference_images" not in first and "reference_images" not in last
    else:
        assert "mask" not in first and kept_frames(last) == kept_last
        assert all(is_color(k["reference_images"][0], RED) for k in (first, last))


@pytest.mark.parametrize(
    "mode, count, expected",
    [
        ("none", 3, ["t2v", "vace", "vace"]),
        ("start", 3, ["vace", "vace", "vace"]),
        ("end", 3, ["t2v", "vace", "vace"]),
        ("start", 1, ["vace"]),
        ("end", 1, ["vace"]),
    ],
)
def test_segment_pipelines_per_reference_mode(mode, count, expected):
    plan = plan_segments(18, 4, 9) if count == 3 else plan_segments(9, 4, 9)
    assert [LongVideo._pipeline(mode, seg, count) for seg in plan] == expected


def test_start_and_end_condition_only_their_segment(worker):
    from PIL import Image

    from wan_worker.contract.jobs import build_job
    from wan_worker.contract.schema import parse_job_input

    job = build_job(parse_job_input({**BASE, "frame_num": 18}), "j")
    plan = plan_segments(18, 4, 9)  # 9 frames, then 9 keeping 4, then 9 keeping 5
    images = {"start": Image.new("RGB", (256, 256), RED), "end": Image.new("RGB", (256, 256), BLUE)}
    held = np.zeros((5, 256, 256, 3), np.uint8)
    for mode, kept in (
        ("start", [[0], [0, 1, 2, 3], [0, 1, 2, 3, 4]]),
        ("end", [None, [0, 1, 2, 3], [0, 1, 2, 3, 4, 8]]),
    ):
        conds = [worker.long_video._conditioning(job, seg, 3, mode, images, held) for seg in plan]
        assert [kept_frames(c.kwargs) if "mask" in c.kwargs else None for c in conds] == kept
        assert conds[0].pipeline == ("vace" if mode == "start" else "t2v")
        assert is_color(
            conds[0 if mode == "start" else 2].kwargs["video"][0 if mode == "start" else -1],
            RED if mode == "start" else BLUE,
        )


def test_too_long_for_job_timeout_fails_up_front(tiny_models, calls):
    recorded, _ = calls
    worker = tiny_worker(tiny_models, job_timeout_s=30, **LONG)
    job = {**BASE, "width": 1280, "height": 1280, "fps": 24, "duration_seconds": 60, "config": {}}
    started = time.monotonic()
    out = handle(worker, job)
    assert time.monotonic() - started < 5 and recorded == []
    assert out["error_code"] == "job_too_long" and out["field"] == "duration_seconds"
    assert "60 s" in out["error"] and "JOB_TIMEOUT_S=30s" in out["error"] and "estimated" in out["error"]
    assert out["details"]["estimated_seconds"] > 30


@pytest.mark.parametrize(
    "change, field",
    [
        ({"duration_seconds": 0}, "duration_seconds"),
        ({"duration_seconds": 61}, "duration_seconds"),
        ({"duration_seconds": "5"}, "duration_seconds"),
        ({"duration_seconds": float("nan")}, "duration_seconds"),
        ({"overlap_frames": 3}, "overlap_frames"),
        ({"overlap_frames": 41}, "overlap_frames"),
        ({"overlap_frames": 4.0}, "overlap_frames"),
        ({"frame_num": 13, "overlap_frames": 5}, "overlap_frames"),  # no room in 5-frame segments
        ({"frame_num": 722}, "frame_num"),  # > 60 s at 12 fps
        ({"frame_num": 6, "segment_prompts": ["a", "b", "c"]}, "segment_prompts"),
        ({"segment_prompts": "a"}, "segment_prompts"),
        ({"segment_prompts": [1]}, "segment_prompts[0]"),
        ({"segment_prompts": [" "]}, "segment_prompts"),
        ({"job_type": "image_fast", "duration_seconds": 5}, "duration_seconds"),
        ({"job_type": "image_fast", "overlap_frames": None, "segment_prompts": ["a"]}, "segment_prompts"),
    ],
)
def test_bad_long_video_input_names_the_field(worker, calls, change, field):
    out = handle(worker, {**BASE, **change})
    assert out["error_code"] == "invalid_input" and out["field"] == field, out
    assert calls[0] == []


def test_worker_serves_a_single_pass_job_after_bad_input(worker):
    handle(worker, {**BASE, "duration_seconds": 0})
    out = handle(worker, {**BASE, "frame_num": 1})
    assert out["status"] == "completed" and "segments" not in out["metadata"]


def test_long_video_through_test_input(tiny_models, s3, tmp_path):
    """``handler.py --test_input``: a two-segment clip of exactly the asked duration, in the bucket."""
    env = worker_env(tiny_models, SEGMENT_FRAMES="9", SINGLE_PASS_MAX_FRAMES="5", WARMUP_ON_START="0", **s3.env())
    code, out, logs = run_test_input({**BASE, "duration_seconds": 1}, env)
    assert code == 0, logs[-3000:]
    asset = out["assets"][0]
    meta = asset["metadata"]
    assert (meta["frames"], meta["fps"], meta["duration_seconds"]) == (12, 12, 1.0)
    assert [(s["frames"], s["kept_frames"]) for s in out["metadata"]["segments"]] == [(9, 0), (9, 6)]
    info = probe_video(requests.get(asset["url"], timeout=30).content, tmp_path)
    assert (info.frames, info.fps, info.faststart) == (12, 12.0, True)
    assert "job_metrics" in logs


def test_out_of_memory_in_a_later_segment_fails_cleanly(tiny_models, tmp_path):
    """Segment 1 runs, segment 2 (VACE) runs out of memory: a clean failure, no temp files."""
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    worker = tiny_worker(tiny_models, work_dir=work_dir, **LONG)

    def oom(module, args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    hook = worker.manager.pipeline("vace").transformer.register_forward_pre_hook(oom)
    try:
        out = handle(worker, {**BASE, "frame_num": 6})
    finally:
        hook.remove()
    assert out["error_code"] == "out_of_memory" and out["retryable"] is True and out["refresh_worker"] is True
    assert "segment 2" in out["error"] and "assets" not in out
    assert list(work_dir.iterdir()) == []
