"""Sections ``reference`` and ``worker``: plain diffusers ``WanPipeline`` (eager, same weights,
prompt and seed), and ``Worker.handle`` end to end (job start to uploaded assets), uncached and
with the step cache: per-step and stage times, PSNR of the decoded frames vs the reference
(uncached) and vs the uncached worker run (cached)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import Context
from .harness import (
    NEGATIVE,
    PROMPT,
    SEED,
    config_flops,
    free_cuda,
    gpu_peak_gib,
    now,
    psnr,
    r,
    reset_peak,
    sync,
    tokens_for,
)
from .jobs import run_job, warm_job


def reference(ctx: Context) -> dict[str, Any]:
    """Plain diffusers WanPipeline, eager, the worker's dtypes (VAE fp32), same weights/prompt/seed."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = now()
    pipe = WanPipeline.from_pretrained(
        ctx.t2v_dir(),
        local_files_only=True,
        dtype={
            "transformer": torch.bfloat16,
            "text_encoder": torch.bfloat16,
            "vae": torch.float32,
            "default": torch.bfloat16,
        },
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    load_s = now() - started
    marks: list[float] = []

    def on_step(p, i, t, kwargs):
        sync()
        marks.append(now())
        return {}

    def call(steps: int):
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=ctx.height,
            width=ctx.width,
            num_frames=ctx.frames,
            num_inference_steps=steps,
            guidance_scale=ctx.guidance,
            output_type="np",
            generator=torch.Generator(device=device).manual_seed(SEED),
            callback_on_step_end=on_step,
        )

    call(1)  # warm-up: kernels, cuDNN handles
    marks.clear()
    reset_peak()
    sync()
    t0 = now()
    out = call(ctx.steps)
    sync()
    total = now() - t0
    ctx.frames_ref = np.asarray(out.frames[0], dtype=np.float32)
    np.save(ctx.work / "reference_frames.npy", ctx.frames_ref.astype(np.float16))  # for a later run's PSNR
    steps = np.diff([t0, *marks])
    res = {
        "load_s": r(load_s, 2),
        "total_s": r(total),
        "steps": len(marks),
        "step_median_s": r(float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0]), 4),
        "first_step_incl_text_encoding_s": r(steps[0]),
        "denoising_s": r(marks[-1] - t0),
        "vae_decode_and_postprocess_s": r(t0 + total - marks[-1]),
        "peak_vram_gib": gpu_peak_gib(),
        "frames_shape": list(ctx.frames_ref.shape),
        "frames_finite": bool(np.isfinite(ctx.frames_ref).all()),
        "frames_std": r(float(ctx.frames_ref.std()), 4),
    }
    tokens = tokens_for(ctx.frames, ctx.height, ctx.width)
    if len(steps) > 1:
        res["tflops_per_step"] = r(
            2 * config_flops(pipe.transformer.config, tokens) / float(np.median(steps[1:])) / 1e12, 1
        )
    return res  # the pipeline and its outputs go with this frame


def worker_runs(ctx: Context) -> dict[str, Any]:
    """The worker's job path: uncached (vs reference) and with the step cache (vs uncached).
    Its warm worker stays for the sections after it."""
    worker, info = ctx.new_worker()
    res: dict[str, Any] = {"load_s": info["load_s"], "warm_compile_s": info["warm_compile_s"]}
    pipe = worker.manager.pipeline("t2v")
    res["warm_job"] = warm_job(worker, ctx.width, ctx.height, ctx.frames)

    if ctx.frames_ref is None and (ctx.work / "reference_frames.npy").exists():
        ctx.frames_ref = np.load(ctx.work / "reference_frames.npy").astype(np.float32)
        res["reference_frames"] = "from an earlier run's reference section (float16 on disk)"
    uncached = run_job(worker, ctx.job(id="uncached", step_cache="off"))
    ctx.frames_worker = uncached.pop("_frames", None)
    uncached["psnr_vs_reference_db"] = psnr(ctx.frames_worker, ctx.frames_ref)
    tokens = tokens_for(ctx.frames, ctx.height, ctx.width)
    if uncached.get("step_median_s"):
        flops = 2 * config_flops(pipe.transformer.config, tokens)  # CFG: two forwards a step
        uncached["tflops_per_step"] = r(flops / uncached["step_median_s"] / 1e12, 1)
    res["uncached"] = uncached

    thresholds = [float(x) for x in ctx.args.cache_thresholds.split(",") if x]
    default = worker.settings.step_cache_threshold
    for threshold in thresholds:
        # STEP_CACHE_THRESHOLD is process-wide: another threshold gets a warm worker of its own
        runner, own = (worker, None) if threshold == default else ctx.new_worker(step_cache_threshold=threshold)
        if own is not None and not ctx.tiny:  # --tiny compiles nothing: no first-call costs to absorb
            own["warm_job"] = warm_job(runner, ctx.width, ctx.height, ctx.frames)
        run = run_job(runner, ctx.job(id=f"cached-{threshold:g}", step_cache="on"))
        frames = run.pop("_frames", None)
        run["psnr_vs_uncached_db"] = psnr(frames, ctx.frames_worker)
        run["psnr_vs_reference_db"] = psnr(frames, ctx.frames_ref)
        if uncached.get("step_median_s") and run.get("step_s"):
            # Each step is two forwards (CFG), cached separately; a cached forward costs one
            # block instead of thirty, so a step's time says how many of its two were skipped.
            half = uncached["step_median_s"] / 2
            run["forwards_served_from_cache"] = sum(min(2, max(0, round((2 * half - x) / half))) for x in run["step_s"])
            run["forwards_total"] = 2 * len(run["step_s"])
        if own is not None:
            run["own_worker"] = own
            del runner
            free_cuda()
        res[f"cached_{threshold:g}" + ("_default" if threshold == default else "")] = run
    res["accel_report"] = worker.manager.accel.as_dict()
    res["resident"] = worker.manager.memory_report()
    failed = [k for k, v in res.items() if isinstance(v, dict) and v.get("status") == "failed"]
    if failed and ctx.s3 is not None:  # say why the storage refused, not only that it did
        res["s3_log_tail"] = (ctx.s3.data_dir / "weed.log").read_text(errors="replace")[-3000:]
    ctx.worker, ctx.worker_origin = worker, "the worker section's (warm)"
    return res
