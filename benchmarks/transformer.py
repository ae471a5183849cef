"""Sections ``attention``, ``transformer`` and ``scaling``: each attention backend, transformer
forwards eager vs compiled with effective TFLOP/s against the analytic FLOP count, and forward
and attention time as the shape grows."""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import Context
from .harness import attention_flops, now, r, sync, tokens_for, transformer_flops


def attention(ctx: Context) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    from wan_worker.runtime.accel import enable_fa3, measure_attention_backends

    return {
        "fa3_available": enable_fa3(),
        "tokens": tokens_for(ctx.frames, ctx.height, ctx.width),
        "backends": measure_attention_backends(tokens_for(ctx.frames, ctx.height, ctx.width)),
    }


def load_transformer(ctx: Context):
    """The T2V transformer from the run's checkpoint, bf16, on the GPU when there is one."""
    import torch
    from diffusers import WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return WanTransformer3DModel.from_pretrained(ctx.t2v_dir(), subfolder="transformer", dtype=torch.bfloat16).to(
        device
    )


def time_forward(transformer, frames: int, height: int, width: int, reps: int = 3) -> dict[str, Any]:
    import torch

    from wan_worker.runtime.accel import transformer_dummy_inputs

    device = next(transformer.parameters()).device
    inputs = transformer_dummy_inputs(transformer, height, width, frames, device)
    with torch.inference_mode():
        sync()
        t = now()
        out = transformer(**inputs)[0]
        sync()
        first = now() - t
        times = []
        for _ in range(reps):
            t = now()
            transformer(**inputs)
            sync()
            times.append(now() - t)
    tokens = tokens_for(frames, height, width)
    layers = transformer.config.num_layers
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    flops = transformer_flops(tokens, dim=dim, ffn=transformer.config.ffn_dim, layers=layers)
    med = float(np.median(times))
    return {
        "first_call_s": r(first, 2),
        "forward_s": r(med, 4),
        "tflops": r(flops / med / 1e12, 1),
        "tokens": tokens,
        "analytic_tflop": r(flops / 1e12, 1),
        "_out": out.float().cpu(),
    }


def transformer(ctx: Context) -> dict[str, Any]:
    """One forward at the job shape per configuration; outputs compared with eager native."""
    import torch

    from wan_worker.runtime.accel import ATTENTION_CANDIDATES, AccelReport, compile_blocks, enable_fa3

    report = AccelReport()

    frames, height, width = ctx.frames, ctx.height, ctx.width
    results: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    transformer = load_transformer(ctx)
    results["eager_native"] = base = time_forward(transformer, frames, height, width)
    ref = base.pop("_out")
    best = None
    if cuda:
        enable_fa3()
        timings = ctx.sections.get("attention", {}).get("backends", {})
        usable = {n: v["seconds"] for n, v in timings.items() if v.get("ok")}
        best = min(usable, key=usable.get) if usable else None
        for name in [c for c in ATTENTION_CANDIDATES if c in usable and c != "native"][:3]:
            try:
                transformer.set_attention_backend(name)
                res = time_forward(transformer, frames, height, width)
                res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
                results[f"eager_{name}"] = res
            except Exception as exc:  # noqa: BLE001
                results[f"eager_{name}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        transformer.set_attention_backend(best or "native")
        fastest = {k: v["forward_s"] for k, v in results.items() if "forward_s" in v}
        if fastest:
            best_eager = min(fastest, key=fastest.get)
            best = best_eager.removeprefix("eager_") if best_eager != "eager_native" else "native"
        transformer.set_attention_backend(best or "native")
        results["best_attention_backend"] = best
        if not ctx.args.no_compile:
            compile_blocks(transformer, report.compile_errors)
            res = time_forward(transformer, frames, height, width)
            res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
            results[f"compiled_{best}"] = res
            try:
                transformer.fuse_qkv_projections()
                res = time_forward(transformer, frames, height, width)
                res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
                results[f"compiled_{best}_fused_qkv"] = res
            except Exception as exc:  # noqa: BLE001
                results[f"compiled_{best}_fused_qkv"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    results["accel_report"] = {k: v for k, v in report.as_dict().items() if k != "transformers"}
    del transformer
    return results


def scaling(ctx: Context) -> dict[str, Any]:
    """Transformer forward vs shape (eager, best attention backend) and the attention share."""
    import torch

    from wan_worker.runtime.accel import enable_fa3

    cuda = torch.cuda.is_available()
    transformer = load_transformer(ctx)
    best = ctx.sections.get("transformer", {}).get("best_attention_backend")
    if cuda and not best:
        from wan_worker.runtime.accel import AccelReport, resolve_attention_backend

        best = resolve_attention_backend(ctx.settings(), AccelReport())
    if cuda and best and best != "native":
        enable_fa3()
        transformer.set_attention_backend(best)
    shapes = (
        [(9, 256, 256), (17, 256, 256)]
        if ctx.tiny
        else [(17, 832, 480), (33, 832, 480), (49, 832, 480), (81, 832, 480), (33, 1280, 720), (81, 1280, 720)]
    )
    rows = []
    for frames, height, width in shapes:
        res = time_forward(transformer, frames, height, width, reps=2)
        res.pop("_out", None)
        tokens = res["tokens"]
        row = {
            "frames": frames,
            "height": height,
            "width": width,
            **res,
            "attention_flop_share": r(attention_flops(tokens) / transformer_flops(tokens), 3),
        }
        if cuda:
            from wan_worker.runtime.accel import _time_attention

            q, k, v = (torch.randn(1, tokens, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            seconds, _ = _time_attention(best or "native", q, k, v, None)
            row["attention_s_per_forward"] = r(30 * seconds, 4)
            row["attention_time_share"] = r(30 * seconds / res["forward_s"], 3)
            del q, k, v
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["time_vs_first"] = r(row["forward_s"] / base["forward_s"], 2)
        row["tokens_vs_first"] = r(row["tokens"] / base["tokens"], 2)
    del transformer
    return {"backend": best or "native", "rows": rows}
