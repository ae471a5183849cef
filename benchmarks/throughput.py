"""Section ``throughput``: back-to-back jobs through one warm ``Worker``, per job type: seconds
per job, jobs per GPU-hour, and how much of a job holds the GPU.

A job's GPU part runs from its start until its frames are decoded (validation, loading,
enhancement, text encoding, denoising, VAE decode); the CPU-only tail after it encodes the
media, uploads it and builds the result (and posts the callback when one is set). While one
job runs that tail the GPU idles, so ``concurrency2_upper_bound`` = job seconds / GPU seconds
is the most a second concurrent job could gain if the tail fully overlapped the next job's
GPU work (at most 2: two jobs at a time can at best double the rate). ``concurrency2`` then
measures it: twice as many jobs from two threads at once, as ``WORKER_CONCURRENCY=2`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .context import Context
from .harness import now, r
from .jobs import StepClock, median, median_runs, run_job


def throughput(ctx: Context) -> dict[str, Any]:
    """``--throughput-jobs`` ``video_fast`` jobs and as many turbo videos on the warm worker,
    each job type after one warm-up job."""
    worker, res = ctx.warm_worker()
    jobs = ctx.args.throughput_jobs
    res["jobs_per_type"] = jobs
    kinds = {"video_fast": lambda tag: ctx.job(id=f"throughput-fast-{tag}", step_cache="off")}
    if ctx.turbo_written():
        kinds["video_turbo"] = lambda tag: ctx.turbo_job("video", id=f"throughput-turbo-{tag}")
    else:
        res["video_turbo"] = {"skipped": "the turbo checkpoint was not written (--models without turbo)"}
    for kind, make in kinds.items():
        warm = run_job(worker, make("warm"))
        warm.pop("_frames", None)
        splits: list[dict[str, Any]] = []
        row = median_runs(worker, make, jobs, observe=lambda run, clock, out=splits: out.append(_split(run, clock)))
        row["warm_up_job"] = {k: warm.get(k) for k in ("status", "error", "total_s")}
        row.update(_rates(row, splits))
        row["concurrency2"] = _concurrent(worker, make, 2 * jobs)
        if row["concurrency2"]["seconds_per_job"] and row.get("seconds_per_job"):
            row["concurrency2_gain"] = r(row["seconds_per_job"] / row["concurrency2"]["seconds_per_job"], 3)
        res[kind] = row
    res["shape"] = {"frames": ctx.frames, "height": ctx.height, "width": ctx.width, "fast_steps": ctx.steps}
    return res


def _split(run: dict[str, Any], clock: StepClock) -> dict[str, Any]:
    """One job's GPU part and CPU-only tail, from its observer's timestamps and its timings."""
    total = clock.finished - clock.started
    gpu = (clock.decoded_at or clock.finished) - clock.started
    timings = run.get("worker_timings") or {}
    encoding, uploading = timings.get("encoding", 0.0), timings.get("uploading", 0.0)
    return {
        "total": total,
        "gpu": gpu,
        "tail": total - gpu,
        "encoding": encoding,
        "uploading": uploading,
        "report": max(0.0, total - gpu - encoding - uploading),
        "stages": clock.stage_seconds(),
    }


def _rates(row: dict[str, Any], splits: list[dict[str, Any]]) -> dict[str, Any]:
    if not splits:
        return {}
    per_job = median([s["total"] for s in splits])
    gpu = median([s["gpu"] for s in splits])
    stages = sorted({name for s in splits for name in s["stages"]})
    return {
        "seconds_per_job": per_job,
        "jobs_per_gpu_hour": r(3600 / per_job, 1) if per_job else None,
        "gpu_s": gpu,
        "cpu_tail_s": median([s["tail"] for s in splits]),
        "cpu_tail_parts_s": {part: median([s[part] for s in splits]) for part in ("encoding", "uploading", "report")},
        "observer_stages_s": {name: median([s["stages"].get(name, 0.0) for s in splits]) for name in stages},
        "gpu_share": r(gpu / per_job, 3) if per_job and gpu else None,
        "concurrency2_upper_bound": r(min(2.0, per_job / gpu), 3) if per_job and gpu else None,
    }


def _concurrent(worker, make: Callable[[str], dict], jobs: int) -> dict[str, Any]:
    """``jobs`` jobs from two threads at once: seconds per job from the first start to the last
    finish, and each job's wait for the GPU (``timings.waiting_for_gpu``)."""

    def one(i: int) -> dict[str, Any]:
        return worker.handle({"id": f"concurrent-{i}", "input": make(f"c{i}")}, send=lambda _: None)

    started = now()
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(one, range(jobs)))
    wall = now() - started
    done = [o for o in outputs if o.get("status") == "completed"]
    waits = [((o.get("metadata") or {}).get("timings") or {}).get("waiting_for_gpu", 0.0) for o in done]
    return {
        "jobs": jobs,
        "completed": len(done),
        "errors": [o.get("error") for o in outputs if o.get("status") != "completed"][:3],
        "wall_s": r(wall),
        "seconds_per_job": r(wall / jobs) if jobs else None,
        "jobs_per_gpu_hour": r(3600 * jobs / wall, 1) if wall else None,
        "waiting_for_gpu_s": [r(w) for w in waits],
    }
