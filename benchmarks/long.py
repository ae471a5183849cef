"""Section ``long``: 15 s and 60 s videos (``duration_seconds``, VACE-continued segments) at
``fast`` and ``turbo``: total, per-segment time, peak VRAM, host RSS growth, and whether
per-segment time, VRAM and RSS stay flat from 15 s to 60 s."""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import Context
from .harness import PROMPT, SEED, GiB, r
from .jobs import run_job


class RssSampler:
    """The process' resident set size before a block and its peak during it (sampled every
    50 ms; the kernel's own high-water mark can't be reset per job)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc, self.interval = psutil.Process(), interval
        self.before = self.peak = 0
        self._stop = None

    def __enter__(self) -> RssSampler:
        import threading

        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _steady_per_frame_s(run: dict[str, Any]) -> float | None:
    """Seconds per frame of the segments that compiled nothing: not segment 1 (its own model),
    not the first VACE segment and not a last segment of another length (each compiles its shape
    once per worker)."""
    times, frames = run.get("segment_s") or [], run.get("segment_frames") or []
    steady = [t / f for i, (t, f) in enumerate(zip(times, frames, strict=True)) if 1 < i < len(times) - 1]
    return float(np.median(steady)) if steady else None


def _long_checks(short: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """Does a longer video cost the same per frame, the same VRAM and no more host memory?"""
    out: dict[str, Any] = {}
    a, b = _steady_per_frame_s(short), _steady_per_frame_s(long)
    if a and b:
        out.update(
            per_frame_s=[r(a, 4), r(b, 4)], segment_time_ratio=r(b / a, 3), segment_time_linear=abs(b / a - 1) <= 0.10
        )
    if short.get("peak_vram_gib") is not None and long.get("peak_vram_gib") is not None:
        grows = long["peak_vram_gib"] - short["peak_vram_gib"]
        out.update(vram_growth_gib=r(grows, 2), vram_flat=grows <= 1.0)
    if short.get("rss_growth_gib") is not None and long.get("rss_growth_gib") is not None:
        # the peak host memory of the long job against the short job's (the first job also pays
        # one-time allocations: CUDA context, compile caches)
        grows = long["rss_before_gib"] + long["rss_growth_gib"] - (short["rss_before_gib"] + short["rss_growth_gib"])
        out.update(rss_peak_growth_short_to_long_gib=r(grows, 3), rss_ok=grows < 2.0)
    return out


def long(ctx: Context) -> dict[str, Any]:
    """Long videos on the warm worker (``duration_seconds``, VACE-continued segments): total
    time, time per segment, peak VRAM and host RSS growth per duration and quality, and
    whether time per segment, VRAM and RSS stay flat as the video gets longer."""
    # --tiny: short segments, so a few seconds at 12 fps make several of them on a CPU
    tiny = dict(segment_frames=13, single_pass_max_frames=13)
    worker, res = ctx.warm_worker(**tiny) if ctx.tiny else ctx.warm_worker()
    durations = [float(d) for d in ctx.args.long_durations.split(",") if d]
    qualities = [q for q in ctx.args.long_qualities.split(",") if q]
    fps = 12 if ctx.tiny else 16
    height, width = (256, 256) if ctx.tiny else (ctx.height, ctx.width)
    steps = 2 if ctx.tiny else ctx.args.long_steps
    res.update(fps=fps, height=height, width=width, durations_s=durations, fast_steps=steps)
    for quality in qualities:
        rows: dict[str, Any] = {}
        for duration in durations:
            job = {
                "job_type": "video_fast",
                "quality": quality,
                "prompt": PROMPT,
                "seed": SEED,
                "width": width,
                "height": height,
                "fps": fps,
                "duration_seconds": duration,
                "step_cache": "off",
                "user_id": "bench",
                "id": f"long-{quality}-{duration:g}",
            }
            if ctx.tiny:
                job["overlap_frames"] = 4
            if quality != "turbo":  # turbo runs its 3 distilled steps; its VACE segments as many
                job["config"] = {"num_inference_steps": steps}
            rows[f"{duration:g}s"] = _long_run(worker, job)
        res[quality] = rows
        res[quality]["checks"] = _long_checks(rows[f"{durations[0]:g}s"], rows[f"{durations[-1]:g}s"])
    res["targets"] = {"segment_time_ratio_within": 0.10, "vram_growth_gib_max": 1.0, "rss_growth_gib_max": 2.0}
    return res


def _long_run(worker, job: dict) -> dict[str, Any]:
    with RssSampler() as rss:
        run = run_job(worker, job, keep_metadata=True)
    run.pop("_frames", None)
    out: dict[str, Any] = {
        "status": run["status"],
        "error": run.get("error"),
        "total_s": run["total_s"],
        "peak_vram_gib": run["peak_vram_gib"],
        "rss_before_gib": r(rss.before / GiB, 2),
        "rss_growth_gib": r((rss.peak - rss.before) / GiB, 3),
        "timings": run.get("worker_timings"),
    }
    if run["status"] != "completed":
        out["output"] = run.get("output")
        return out
    meta = run.get("metadata") or {}
    segments = meta.get("segments") or []
    out.update(
        segments=len(segments),
        segment_frames=[s["frames"] for s in segments],
        segment_steps=[s["steps"] for s in segments],
        segment_s=[r(sum(s["timings"].values())) for s in segments],
        worker_peak_vram_gib=meta.get("peak_vram_gib"),
    )
    full = [t for s, t in zip(segments, out["segment_s"], strict=True) if s["frames"] == max(out["segment_frames"])]
    later = full[1:] or full  # segment 1 runs the T2V (or turbo) model, the rest VACE
    out["per_segment_s"] = r(float(np.median(later))) if later else None
    return out
