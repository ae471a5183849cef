"""Driving the worker's real job path: ``Worker.handle`` with a ``JobObserver`` that timestamps
the stages, text encoding, every denoising step and the decoded frames, and the jobs the
sections send."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from wan_worker.stages.observer import JobObserver

from .harness import NEGATIVE, PROMPT, SEED, gpu_peak_gib, now, r, reset_peak, sync


class StepClock(JobObserver):
    """Synchronised timestamps of the job's start and end (set by ``run_job``), each progress
    stage, text encoding, every denoising step and the decoded frames: the
    ``wan_worker.stages.observer.JobObserver`` passed to ``Worker.handle``."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.started: float | None = None
        self.finished: float | None = None
        self.stages: list[tuple[str, float]] = []
        self.generating_at: float | None = None
        self.text_encoded_at: float | None = None
        self.decoded_at: float | None = None
        self.frames = None

    def stage_started(self, name: str) -> None:
        sync()
        self.stages.append((name, now()))
        if name == "generating":
            self.marks, self.generating_at = [], self.stages[-1][1]

    def stage_seconds(self) -> dict[str, float]:
        """Each stage's seconds, from its start to the next one's (the last one's to the job's end)."""
        ends = [t for _, t in self.stages[1:]] + [self.finished or now()]
        out: dict[str, float] = {}
        for (name, start), end in zip(self.stages, ends, strict=True):
            out[name] = out.get(name, 0.0) + end - start
        return out

    def text_encoded(self) -> None:
        sync()
        self.text_encoded_at = now()

    def step_finished(self, step: int, total: int) -> None:
        sync()
        self.marks.append(now())

    def frames_decoded(self, frames) -> None:
        sync()
        self.decoded_at, self.frames = now(), frames


def run_job(worker, job: dict, clock: StepClock | None = None, keep_metadata: bool = False) -> dict[str, Any]:
    """``Worker.handle`` on one job, with stage and per-step timings and the decoded frames
    (and the job's whole ``metadata`` with ``keep_metadata``)."""
    clock = clock or StepClock()
    sent: list = []
    reset_peak()
    sync()
    clock.started = started = now()
    output = worker.handle({"id": job.get("id", "bench"), "input": job}, send=sent.append, observer=clock)
    clock.finished = now()
    total = clock.finished - started
    meta = output.get("metadata") or {}
    encoded_at = clock.text_encoded_at
    steps = np.diff([encoded_at or started, *clock.marks]).tolist() if clock.marks else []
    text_encoding = encoded_at - clock.generating_at if encoded_at and clock.generating_at else None
    result: dict[str, Any] = {
        "status": output.get("status", "failed"),
        "error": output.get("error"),
        "total_s": r(total),
        "text_encoding_s": r(text_encoding),
        "steps": len(steps),
        "step_s": [r(s, 4) for s in steps],
        "step_median_s": r(float(np.median(steps)), 4) if steps else None,
        "denoising_s": r(sum(steps)) if steps else None,
        "vae_decode_and_postprocess_s": r(clock.decoded_at - clock.marks[-1])
        if clock.marks and clock.decoded_at is not None
        else None,
        "worker_timings": meta.get("timings"),
        "peak_vram_gib": gpu_peak_gib(),
        "file_size_bytes": ((output.get("assets") or [{}])[0].get("metadata") or {}).get("file_size_bytes"),
        "step_cache": meta.get("step_cache"),
    }
    if result["status"] != "completed":
        result["output"] = {k: v for k, v in output.items() if k not in ("assets",)}
    if keep_metadata:
        result["metadata"] = meta
    result["_frames"] = clock.frames
    return result


def bench_job(width: int, height: int, frames: int, steps: int, **extra) -> dict[str, Any]:
    """The benchmark's ``video_fast`` job: fixed prompt and seed, step cache off."""
    job = {
        "job_type": "video_fast",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "seed": SEED,
        "width": width,
        "height": height,
        "frame_num": frames,
        "step_cache": "off",
        "config": {"num_inference_steps": steps, "sample_shift": 5.0},
        "user_id": "bench",
    }
    job.update(extra)
    return job


def warm_job(worker, width: int, height: int, frames: int) -> dict[str, Any]:
    """A 2-step ``video_fast`` job at the shape, so the measured jobs pay no first-call costs
    (cuBLAS and cuDNN handles, the text encoder's first call): what a warm worker's job costs."""
    warm = run_job(worker, bench_job(width, height, frames, 2, id="warm"))
    return {k: warm[k] for k in ("status", "total_s", "error") if k in warm}


def turbo_job(width: int, height: int, frames: int, kind: str, **extra) -> dict[str, Any]:
    """``quality: "turbo"`` (its distilled 3 steps, no CFG) at the benchmark shape."""
    job: dict[str, Any] = {
        "job_type": f"{kind}_fast",
        "quality": "turbo",
        "prompt": PROMPT,
        "seed": SEED,
        "width": width,
        "height": height,
        "user_id": "bench",
    }
    if kind == "video":
        job["frame_num"] = frames
    job.update(extra)
    return job


def median(values: list[float]) -> float | None:
    return r(float(np.median(values))) if values else None


def median_runs(
    worker,
    make_job: Callable[[int], dict[str, Any]],
    runs: int,
    observe: Callable[[dict[str, Any], StepClock], None] | None = None,
) -> dict[str, Any]:
    """``runs`` jobs end to end (job start to uploaded assets); the median total and the
    median of each stage of the jobs' ``metadata.timings``. ``observe`` sees each completed
    job's row and its ``StepClock``."""
    rows = []
    for i in range(runs):
        clock = StepClock()
        row = run_job(worker, make_job(i), clock)
        row.pop("_frames", None)
        rows.append(row)
        if observe is not None and row["status"] == "completed":
            observe(row, clock)
    done = [row for row in rows if row["status"] == "completed"]
    out: dict[str, Any] = {"runs": len(rows), "completed": len(done)}
    if len(done) < len(rows):
        out["failed"] = next(row for row in rows if row["status"] != "completed")
    if not done:
        return out
    stages = sorted({k for row in done for k in (row.get("worker_timings") or {})})
    out.update(
        total_s=median([row["total_s"] for row in done]),
        totals_s=[row["total_s"] for row in done],
        stages_s={k: median([(row["worker_timings"] or {}).get(k, 0.0) for row in done]) for k in stages},
        steps=done[0]["steps"],
        step_median_s=r(float(np.median([row["step_median_s"] for row in done if row["step_median_s"]])), 4)
        if any(row["step_median_s"] for row in done)
        else None,
        peak_vram_gib=max((row["peak_vram_gib"] or 0.0) for row in done) or None,
    )
    return out
