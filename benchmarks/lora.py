"""Section ``lora``: per-job LoRAs on a compiled warm worker of its own: first use, a switch
between cached LoRAs, per-step overhead with vs without a LoRA, and graphs compiled after
warm-up."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .checkpoints import write_lora
from .context import Context
from .harness import r
from .jobs import bench_job, run_job


def lora(ctx: Context) -> dict[str, Any]:
    """Per-job LoRAs on a compiled warm worker of its own (``LORA_DIR`` must exist when the
    models load: slots go in before compile; the main worker stays slot-free so the other
    sections measure the worker as it runs without LoRAs). Two rank-``--lora-rank`` LoRAs on
    every linear layer: first use, a switch between cached ones, the per-step overhead of a
    LoRA against no LoRA, and the graphs compiled after warm-up (must be none)."""
    import torch

    lora_dir = ctx.work / "loras"
    cfg = json.loads((ctx.t2v_dir() / "transformer" / "config.json").read_text())
    dims = dict(
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], ffn=cfg["ffn_dim"], layers=cfg["num_layers"]
    )
    rank = ctx.args.lora_rank
    sizes = {
        name: write_lora(lora_dir / f"{name}.safetensors", **dims, rank=rank, seed=seed)
        for seed, name in enumerate(("bench_a", "bench_b"), 1)
    }
    worker, res = ctx.warm_worker(lora_dir=lora_dir)
    res.update(rank=rank, shapes=dims, file_bytes=sizes, slot_rank=worker.settings.max_lora_rank)
    steps = 2 if ctx.tiny else ctx.args.lora_steps

    def job(name: str | None, tag: str) -> dict[str, Any]:
        extra = {"loras": [{"name": name, "scale": 1.0}]} if name else {}
        run = run_job(worker, bench_job(ctx.width, ctx.height, ctx.frames, steps, id=f"lora-{tag}", **extra))
        run.pop("_frames", None)
        timings = run.get("worker_timings") or {}
        denoising = timings.get("denoising")
        return {
            "status": run["status"],
            "error": run.get("error"),
            "total_s": run["total_s"],
            "steps": run["steps"],
            "step_median_s": run["step_median_s"],
            "denoising_per_step_s": r(denoising / run["steps"], 4) if denoising and run["steps"] else None,
            "lora_loading_s": r(timings.get("lora_loading")),
            "lora_switch_s": r(timings.get("lora_switch"), 4),
        }

    res["warm_job"] = job(None, "warm")  # the job shape's remaining first-call costs
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    sequence = [
        ("no_lora_1", None),
        ("first_use_a", "bench_a"),
        ("first_use_b", "bench_b"),
        ("switch_to_a_cached", "bench_a"),
        ("switch_to_b_cached", "bench_b"),
        ("no_lora_2", None),
    ]
    runs = {tag: job(name, tag) for tag, name in sequence}
    res["runs"] = runs
    res["new_graphs_after_warmup"] = counters["stats"]["unique_graphs"] - graphs_before
    res["compiled"] = bool(worker.settings.compile_transformer and torch.cuda.is_available())
    first = runs["first_use_a"]
    res["first_use_s"] = r((first["lora_loading_s"] or 0) + (first["lora_switch_s"] or 0))
    switches = [runs[t]["lora_switch_s"] for t in ("switch_to_a_cached", "switch_to_b_cached")]
    res["switch_cached_s"] = r(max(s for s in switches if s is not None), 4) if any(switches) else None
    with_lora = [runs[t]["step_median_s"] for t, name in sequence if name and runs[t]["step_median_s"]]
    without = [runs[t]["step_median_s"] for t, name in sequence if not name and runs[t]["step_median_s"]]
    if with_lora and without:
        base = float(np.median(without))
        res["step_s"] = {"with_lora": r(float(np.median(with_lora)), 4), "without_lora": r(base, 4)}
        res["per_step_overhead_pct"] = r(100 * (float(np.median(with_lora)) / base - 1), 2)
    main = (ctx.sections.get("worker") or {}).get("uncached") or {}
    if main.get("step_median_s") and without:
        # the slots' own cost when no LoRA is active: same shape, a worker without slots
        res["slot_free_worker_step_s"] = main["step_median_s"]
        res["slots_idle_overhead_pct"] = r(100 * (float(np.median(without)) / main["step_median_s"] - 1), 2)
    res["targets"] = {"switch_s": 0.5, "per_step_overhead_pct": 5.0, "new_graphs_after_warmup": 0}
    res["all_completed"] = all(v["status"] == "completed" for v in runs.values())
    return res  # its worker goes with this frame
