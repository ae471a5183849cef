"""Where an FP8 forward's time goes, and which variant of it is fastest (GPU only).

A transformer of the real Wan2.1-T2V-1.3B width with fewer blocks (``--layers``; each block
costs the same, so per-block numbers scale to 30), at the job shape. Each variant starts from
the same random weights, is compiled as the worker compiles it, and reports its first call
(compile), the graphs dynamo built, the median forward, the relative error against eager
bf16, and with ``--profile`` the GPU time by kernel family.

usage: python scripts/fp8_probe.py [--layers 4] [--variants bf16,fp8,...] [--profile fp8,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.checkpoints import WAN_TRANSFORMER
from benchmarks.harness import versions
from wan_worker.runtime import accel, fp8, patches


def _no_smoothing() -> contextlib.AbstractContextManager:
    return _patched(fp8, "smooth_keys", lambda k: k)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _tensorwise_linears(transformer: torch.nn.Module) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

    quantize_(
        transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()), filter_fn=fp8._block_linear
    )


def _fp8_attention(t: torch.nn.Module) -> None:
    fp8.enable_fp8_attention(t, fp8.fa3_flash_attn_func())


def _fp8(t: torch.nn.Module) -> None:
    fp8.quantize_block_linears(t)
    _fp8_attention(t)


def _fp8_tanh_gelu(t: torch.nn.Module) -> None:
    """The fp8 set-up as it was before the sigmoid-form GELU."""
    _fp8(t)
    for module in t.modules():
        if "gelu" in vars(module):
            del module.gelu


#: name -> (set-up applied to a bf16 FA3 transformer before compile, compile mode or inductor options)
VARIANTS: dict[str, tuple[Callable[[torch.nn.Module], None], str | dict | None]] = {
    "bf16": (lambda t: None, None),
    "fp8_tanh_gelu": (_fp8_tanh_gelu, None),
    "fp8_multi_kernel": (_fp8, {"triton.multi_kernel": 1}),
    "fp8_coordinate_descent": (_fp8, {"coordinate_descent_tuning": True}),
    "fp8": (lambda t: (fp8.quantize_block_linears(t), _fp8_attention(t)), None),
    "fp8_attention_only": (_fp8_attention, None),
    "fp8_linears_only": (fp8.quantize_block_linears, None),
    "fp8_tensorwise": (lambda t: (_tensorwise_linears(t), _fp8_attention(t)), None),
    "fp8_max_autotune": (lambda t: (fp8.quantize_block_linears(t), _fp8_attention(t)), "max-autotune-no-cudagraphs"),
    "fp8_fused_qkv": (lambda t: (t.fuse_qkv_projections(), fp8.quantize_block_linears(t), _fp8_attention(t)), None),
}
#: variants that run with K smoothing off (patched for their compile and calls)
NO_SMOOTHING = {"fp8_no_smoothing": "fp8"}


def _family(name: str) -> str:
    n = name.lower()
    if n.startswith("triton"):
        return "triton (fused elementwise, reductions, quantization)"
    if "flash" in n or "fmha" in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "sm90_xmma", "cublas", "wgmma")):
        return "matmul"
    return "other"


def profile(transformer: torch.nn.Module, inputs: dict) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        transformer(**inputs)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + us
    families: dict[str, float] = {}
    for name, us in kernels.items():
        families[_family(name)] = families.get(_family(name), 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {
        "gpu_ms": round(sum(kernels.values()) / 1e3, 2),
        "families_ms": {k: round(v / 1e3, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [(name[:140], round(us / 1e3, 3)) for name, us in top],
    }


def run_variant(name: str, base: torch.nn.Module, inputs: dict, ref: torch.Tensor, reps: int, prof: bool) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    source = NO_SMOOTHING.get(name, name)
    setup, mode = VARIANTS[source]
    smoothing = _no_smoothing() if name in NO_SMOOTHING else contextlib.nullcontext()
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    transformer = copy.deepcopy(base)
    out: dict = {}
    with smoothing:
        setup(transformer)
        options = mode if isinstance(mode, dict) else None
        accel.compile_blocks(transformer, errors := {}, mode=None if options else mode, options=options)
        with torch.inference_mode():
            torch.cuda.synchronize()
            started = time.perf_counter()
            first = transformer(**inputs)[0]
            torch.cuda.synchronize()
            out["first_call_s"] = round(time.perf_counter() - started, 2)
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                transformer(**inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        out["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
        out["forward_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 2)
        out["forward_ms_min"] = round(min(times) * 1e3, 2)
        out["rel_err_vs_eager_bf16"] = round(float((first.float() - ref).norm() / ref.norm()), 4)
        if errors:
            out["compile_errors"] = errors
        if prof:
            out["profile"] = profile(transformer, inputs)
    del transformer
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--profile", default="bf16,fp8")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=832)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--out")
    args = p.parse_args()

    torch.manual_seed(0)
    base = accel_ready(args.layers)
    inputs = accel.transformer_dummy_inputs(base, args.height, args.width, args.frames, "cuda")
    with torch.inference_mode():
        ref = base(**inputs)[0].float()
    result = {"versions": versions(), "layers": args.layers, "shape": [args.frames, args.height, args.width]}
    result["variants"] = {}
    for name in args.variants.split(","):
        try:
            result["variants"][name] = run_variant(name, base, inputs, ref, args.reps, name in args.profile.split(","))
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            result["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(name, json.dumps(result["variants"][name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def accel_ready(layers: int) -> torch.nn.Module:
    """The real-width transformer with ``layers`` blocks, bf16 on the GPU, FA3 as its backend."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**{**WAN_TRANSFORMER, "num_layers": layers}).to("cuda", torch.bfloat16).eval()
    keep = transformer._keep_in_fp32_modules  # as from_pretrained(torch_dtype=bfloat16) leaves them
    for name, param in transformer.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    if patches.enable_fa3():
        transformer.set_attention_backend("_flash_3")
    return transformer


if __name__ == "__main__":
    main()
