"""Section ``turbo``: ``quality: "turbo"`` on the warm worker, a video and an image end to
end, median of ``--turbo-runs``, stage times from the job's ``metadata.timings``, and the
speed-up over the same run's uncached ``video_fast``."""

from __future__ import annotations

import math
from typing import Any

from .context import Context
from .harness import now, r
from .jobs import median_runs, run_job


def turbo(ctx: Context) -> dict[str, Any]:
    """``quality: "turbo"`` on the warm worker: a video and an image at the benchmark shape,
    median of N end-to-end runs after one warm-up job each (its transformer compiles on first
    use), and the same run's uncached ``video_fast`` for the speed-up."""
    worker, res = ctx.warm_worker()
    runs = 1 if ctx.tiny else ctx.args.turbo_runs
    for kind in ("video", "image"):
        t = now()
        first = run_job(worker, ctx.turbo_job(kind, id=f"turbo-{kind}-first"))
        first.pop("_frames", None)
        res[f"{kind}_first_job"] = {k: first.get(k) for k in ("status", "error", "total_s", "output")}
        res[f"{kind}_first_job"]["seconds"] = r(now() - t)
        res[kind] = median_runs(worker, lambda i, k=kind: ctx.turbo_job(k, id=f"turbo-{k}-{i}"), runs)
    res["video"]["shape"] = {"frames": ctx.frames, "height": ctx.height, "width": ctx.width}
    res["image"]["shape"] = {"frames": 1, "height": ctx.height, "width": ctx.width}
    fast = (ctx.sections.get("worker") or {}).get("uncached") or {}
    if fast.get("status") == "completed":
        res["video_fast"] = {"total_s": fast["total_s"], "source": "the worker section (same invocation)"}
    else:
        run = run_job(worker, ctx.job(id="turbo-vs-fast", step_cache="off"))
        run.pop("_frames", None)
        res["video_fast"] = {
            "total_s": run["total_s"],
            "status": run["status"],
            "steps": run["steps"],
            "source": "run here",
        }
    if res["video"].get("total_s") and res["video_fast"].get("total_s"):
        res["speedup_vs_video_fast"] = r(res["video_fast"]["total_s"] / res["video"]["total_s"], 2)
    res["targets"] = {"video_s": 4.0, "image_s": 0.6}
    if not ctx.tiny:
        res["meets_targets"] = {
            "video": (res["video"].get("total_s") or math.inf) <= 4.0,
            "image": (res["image"].get("total_s") or math.inf) <= 0.6,
        }
    res["resident"] = worker.manager.memory_report()
    return res
