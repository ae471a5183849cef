"""Section ``fp8``: the same-seed ``video_fast`` job in bf16 and ``PRECISION=fp8``, each in a
fresh process: end to end, per forward, warm-up compile time, PSNR of fp8 vs bf16 frames."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

import numpy as np

from .context import Context
from .harness import gpu_peak_gib, now, psnr, r
from .jobs import bench_job, run_job, warm_job
from .transformer import time_forward


def fp8(ctx: Context) -> dict[str, Any]:
    """The same-seed ``video_fast`` job in bf16 and in ``PRECISION=fp8``, each in a fresh
    process with empty compile caches: end to end, per forward, compile time, and the PSNR
    of the fp8 frames against the bf16 ones (target: at least 35 dB)."""
    runs: dict[str, Any] = {}
    frames: dict[str, np.ndarray] = {}
    jobs = 1 if ctx.tiny else ctx.args.precision_jobs
    for precision in ("bf16", "fp8"):
        env = ctx.child_env(ctx.settings(precision=precision))
        cache = ctx.work / f"inductor-cache-{precision}"
        shutil.rmtree(cache, ignore_errors=True)
        env.update(WARMUP_ON_START="0", TORCHINDUCTOR_CACHE_DIR=str(cache), COMPILE_CACHE_DIR=str(cache / "artifacts"))
        frames_path = ctx.work / f"frames-{precision}.npy"
        frames_path.unlink(missing_ok=True)
        extra = ["--frames-out", str(frames_path), "--height", str(ctx.height), "--width", str(ctx.width)]
        extra += ["--frames", str(ctx.frames), "--steps", str(ctx.steps), "--precision-jobs", str(jobs)]
        runs[precision] = ctx.run_child("precision_run", extra, env, timeout=1800)
        if "error" not in runs[precision] and frames_path.exists():
            frames[precision] = np.load(frames_path).astype(np.float32)
    out: dict[str, Any] = {"versions": ctx.result.get("versions", {}).get("stack"), **runs}
    bf16, fp8 = runs.get("bf16", {}), runs.get("fp8", {})
    out["fp8_applied"] = (fp8.get("precision") or {}).get("applied") == "fp8"
    if not out["fp8_applied"]:
        precision = fp8.get("precision") or {}
        what = "partly (mixed)" if precision.get("applied") == "mixed" else "bf16"
        out["note"] = f"fp8 was not applied ({precision.get('reason')}): the fp8 run is {what}"
    if "bf16" in frames and "fp8" in frames:
        out["psnr_fp8_vs_bf16_db"] = psnr(frames["fp8"], frames["bf16"])
        value = out["psnr_fp8_vs_bf16_db"]
        out["meets_35db"] = value >= 35 if out["fp8_applied"] and value is not None else None
    for key in ("forward_s", "end_to_end_s", "step_median_s"):
        if bf16.get(key) and fp8.get(key):
            out[f"speedup_{key.removesuffix('_s')}"] = r(bf16[key] / fp8[key], 3)
    return out


def child_precision_run(args: argparse.Namespace) -> dict[str, Any]:
    """One worker process at the precision its environment sets: load, warm-up compile (timed),
    a 2-step warm job, the benchmark job end to end ``--precision-jobs`` times (the median; the
    first completed job's record and decoded frames, to a file), one transformer forward."""
    from wan_worker.serving.worker import get_worker

    started = now()
    worker = get_worker()
    worker.manager.encoder_pipe()
    out: dict[str, Any] = {"load_s": r(now() - started, 2)}
    started = now()
    worker.manager.warm_up(args.width, args.height, args.frames)
    out["warm_compile_s"] = r(now() - started, 2)
    out["warmups"] = worker.manager.accel.as_dict().get("warmups")
    out["warm_job"] = warm_job(worker, args.width, args.height, args.frames)  # as the worker section measures
    jobs, done = [], []
    for _ in range(max(1, args.precision_jobs)):
        jobs.append(run_job(worker, bench_job(args.width, args.height, args.frames, args.steps, id="precision")))
        frames = jobs[-1].pop("_frames", None)
        if jobs[-1].get("status") == "completed" and jobs[-1].get("total_s") is not None:
            done.append(jobs[-1])
            if frames is not None and len(done) == 1:
                np.save(args.frames_out, np.asarray(frames, dtype=np.float16))
    out["job"] = done[0] if done else jobs[0]
    if done:
        out["end_to_end_runs_s"] = [job["total_s"] for job in done]
        out["end_to_end_s"] = r(float(np.median(out["end_to_end_runs_s"])))
        steps = [job["step_median_s"] for job in done if job.get("step_median_s") is not None]
        out["step_median_s"] = r(float(np.median(steps)), 4) if steps else None
        out["timings_runs"] = [job["worker_timings"] for job in done]
    transformer = worker.manager.pipeline("t2v").transformer
    forward = time_forward(transformer, args.frames, args.height, args.width)
    forward.pop("_out", None)
    out.update(
        forward_s=forward["forward_s"], forward_tflops=forward["tflops"], first_forward_s=forward["first_call_s"]
    )
    out["precision"] = worker.manager.accel.as_dict().get("precision")
    out["compile_errors"] = worker.manager.accel.as_dict().get("compile_errors")
    out["peak_vram_gib"] = gpu_peak_gib()
    return out
