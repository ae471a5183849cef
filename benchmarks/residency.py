"""Sections ``residency`` and ``turbo_residency``: a fresh process capped at ``--card-gb`` of the
card under ``GPU_MEMORY_BUDGET_GB=--budget-gib``: all job types and reference modes, or every
model resident at once with turbo, ``video_fast`` and VACE jobs; peak allocated memory per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wan_worker.stages.observer import JobObserver

from .context import Context
from .harness import PROMPT, SEED, GiB, now, png_data_uri, r


def residency(ctx: Context) -> dict[str, Any]:
    return _budget_child(ctx, "residency")


def turbo_residency(ctx: Context) -> dict[str, Any]:
    """Everything resident (T2V, VACE, turbo, UMT5; Qwen when written) in a fresh process
    capped at ``--card-gb`` of the card, under ``GPU_MEMORY_BUDGET_GB=--budget-gib``."""
    return _budget_child(ctx, "turbo_residency")


def _budget_child(ctx: Context, child: str) -> dict[str, Any]:
    """A fresh process under the card cap and memory budget (clean peak statistics)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    env = ctx.child_env(ctx.settings(gpu_memory_budget_gb=ctx.args.budget_gib))
    extra = ["--card-gb", str(ctx.args.card_gb), "--residency-steps", str(ctx.args.residency_steps)]
    return ctx.run_child(child, extra, env, timeout=1800, must_succeed=False)


class StagePeaks(JobObserver):
    """Peak allocated GPU memory at each stage start: the generate stage resets the peak
    statistics when it starts, so the enhancer's peak is read here before it is lost."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def stage_started(self, name: str) -> None:
        import torch

        self.seen.append(torch.cuda.max_memory_allocated() / GiB)


def child_residency(args: argparse.Namespace) -> dict[str, Any]:
    """All job types and reference modes under a 48 GB cap and the 44 GiB budget."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, args.card_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    from wan_worker.serving.worker import get_worker

    worker = get_worker()
    peaks = StagePeaks()
    w, h = 480, 832
    img = {
        "single": png_data_uri(w, h, (200, 40, 40)),
        "start": png_data_uri(w, h, (40, 200, 40)),
        "end": png_data_uri(w, h, (40, 40, 200)),
    }
    steps = {"num_inference_steps": args.residency_steps}
    jobs: list[tuple[str, dict]] = []
    from wan_worker.contract.presets import JOB_TYPES

    jobs += [(jt, {"job_type": jt}) for jt in JOB_TYPES]
    jobs += [
        (
            "video_fast+single",
            {"job_type": "video_fast", "reference_mode": "single", "reference_image_url": img["single"]},
        ),
        ("video_fast+start", {"job_type": "video_fast", "reference_mode": "start", "first_frame": img["start"]}),
        ("video_fast+end", {"job_type": "video_fast", "reference_mode": "end", "last_frame": img["end"]}),
        (
            "video_high+both",
            {"job_type": "video_high", "reference_mode": "both", "first_frame": img["start"], "last_frame": img["end"]},
        ),
        (
            "video7b_high_enhanced+both",
            {
                "job_type": "video7b_high_enhanced",
                "reference_mode": "both",
                "first_frame": img["start"],
                "last_frame": img["end"],
            },
        ),
        (
            "image_fast+single",
            {"job_type": "image_fast", "reference_mode": "single", "reference_image_url": img["single"]},
        ),
        ("image_high+start", {"job_type": "image_high", "reference_mode": "start", "first_frame": img["start"]}),
        (
            "image7b_high_enhanced+single",
            {
                "job_type": "image7b_high_enhanced",
                "reference_mode": "single",
                "reference_image_url": img["single"],
                "metadata": {"exact_copy_mode": True},
            },
        ),
    ]
    rows = []
    overall = 0.0
    for name, spec in jobs:
        job = {"prompt": PROMPT, "seed": SEED, "strict_references": True, "config": dict(steps), **spec}
        peaks.seen.clear()
        torch.cuda.reset_peak_memory_stats()
        t = now()
        try:
            out = worker.handle({"id": f"res-{len(rows)}", "input": job}, send=lambda p: None, observer=peaks)
        except Exception as exc:  # noqa: BLE001
            out = {"error": f"{type(exc).__name__}: {exc}"}
        seconds = now() - t
        peak = max([torch.cuda.max_memory_allocated() / GiB, *peaks.seen])
        overall = max(overall, peak)
        meta = out.get("metadata") or {}
        asset = ((out.get("assets") or [{}])[0].get("metadata")) or {}
        rows.append(
            {
                "job": name,
                "status": out.get("status", "failed"),
                "error": out.get("error"),
                "seconds": r(seconds, 1),
                "peak_gib": r(peak, 2),
                "pipeline": asset.get("pipeline"),
                "reference_mode_applied": asset.get("reference_mode_applied"),
                "frames": asset.get("frames"),
                "enhancement_applied": meta.get("enhancement_applied"),
                "enhancement_reason": meta.get("enhancement_reason"),
                "quality_degraded": meta.get("quality_degraded"),
                "resident_after": worker.manager.memory_report().get("resident"),
                "reserved_gib": r(torch.cuda.max_memory_reserved() / GiB, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    moves = [
        {"module": m.module, "to": m.to, "gib": r(m.nbytes / GiB, 2), "s": r(m.seconds, 2)}
        for m in worker.manager.moves
    ]
    return {
        "cap_gb": args.card_gb,
        "cap_fraction": round(fraction, 4),
        "budget_gib": worker.settings.gpu_memory_budget_gb,
        "steps_per_job": args.residency_steps,
        "overall_peak_gib": r(overall, 2),
        "all_completed": all(row["status"] == "completed" for row in rows),
        "jobs": rows,
        "moves": moves,
        "module_gib": {n: r(res.nbytes / GiB, 2) for n, res in worker.manager._modules.items()},
    }


def child_turbo_residency(args: argparse.Namespace) -> dict[str, Any]:
    """Every model resident at once (T2V, VACE, turbo, UMT5, and Qwen when its checkpoint is
    there) under the card cap and budget; turbo, ``video_fast`` and VACE jobs, peak per job."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, args.card_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    from wan_worker.serving.worker import get_worker

    worker = get_worker()
    manager, s = worker.manager, worker.settings
    load_s: dict[str, Any] = {}
    for name in ("t2v", "vace", "turbo"):
        t = now()
        manager.pipeline(name)
        load_s[name] = r(now() - t, 1)
    manager.encoder_pipe()
    if (Path(s.models_dir) / Path(s.qwen_model).name).is_dir():
        t = now()
        manager.qwen()
        load_s["qwen"] = r(now() - t, 1)
    after_load = {"allocated_gib": r(torch.cuda.memory_allocated() / GiB, 2), **manager.memory_report()}
    w, h, frames = 480, 832, 81
    steps = {"num_inference_steps": args.residency_steps}
    base = {"prompt": PROMPT, "seed": SEED, "width": w, "height": h, "user_id": "bench"}
    jobs = [
        ("video_turbo", {"job_type": "video_fast", "quality": "turbo", "frame_num": frames}),
        ("image_turbo", {"job_type": "image_fast", "quality": "turbo"}),
        ("video_fast", {"job_type": "video_fast", "frame_num": frames, "config": dict(steps)}),
        (
            "video_fast+single",
            {
                "job_type": "video_fast",
                "frame_num": frames,
                "config": dict(steps),
                "reference_mode": "single",
                "reference_image_url": png_data_uri(w, h, (200, 40, 40)),
                "strict_references": True,
            },
        ),
        ("video_turbo_again", {"job_type": "video_fast", "quality": "turbo", "frame_num": frames}),
    ]
    rows, overall = [], 0.0
    for name, spec in jobs:
        torch.cuda.reset_peak_memory_stats()
        t = now()
        try:
            out = worker.handle({"id": f"tres-{len(rows)}", "input": {**base, **spec}}, send=lambda p: None)
        except Exception as exc:  # noqa: BLE001
            out = {"error": f"{type(exc).__name__}: {exc}"}
        peak = torch.cuda.max_memory_allocated() / GiB
        overall = max(overall, peak)
        rows.append(
            {
                "job": name,
                "status": out.get("status", "failed"),
                "error": out.get("error"),
                "seconds": r(now() - t, 2),
                "peak_gib": r(peak, 2),
                "resident_after": manager.memory_report().get("resident"),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "cap_gb": args.card_gb,
        "cap_fraction": round(fraction, 4),
        "budget_gib": s.gpu_memory_budget_gb,
        "steps_per_fast_job": args.residency_steps,
        "load_s": load_s,
        "after_load": after_load,
        "overall_peak_gib": r(overall, 2),
        "meets_44gib": overall <= 44.0,
        "all_completed": all(row["status"] == "completed" for row in rows),
        "jobs": rows,
        "moves": [{"module": m.module, "to": m.to, "gib": r(m.nbytes / GiB, 2)} for m in manager.moves],
    }
