"""Where an FP8 forward's time goes, and which variant of it is fastest (GPU only).

A transformer of the real Wan2.1-T2V-1.3B width with fewer blocks (``--layers``; each block
costs the same, so per-block numbers scale to 30), at the job shape. Each variant starts from
the same random weights and is set up and compiled as the worker does it. The script reports
each variant's first call (compile), the graphs dynamo built, the error against eager bf16,
the forward time and, with ``--profile``, the GPU time by kernel. The forwards are timed in
rounds, one of each variant per round, so a drifting clock affects every variant alike. Compile
times share one kernel cache: a variant's first call is only its full compile when it comes first.

usage (from the repository root): bash scripts/device_bench.sh --script scripts/fp8_probe.py \
    [--layers 4] [--variants bf16,fp8,...] [--profile fp8,bf16] [--reps 7] [--out FILE]
(or PYTHONPATH=.:src python scripts/fp8_probe.py ...)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from benchmarks.checkpoints import WAN_TRANSFORMER
from benchmarks.harness import sync, versions
from wan_worker.runtime import accel, fp8, patches

#: ``*_wide_rows``: the widest row a reduction over the last dimension reads in one pass
#: (inductor's default stops at 1024; Wan's hidden size is 1536).
PERSISTENT_ROW_LIMIT = 2048


class WideRowChoices(InductorChoices):
    """Inductor's heuristics, except that inner reductions over rows of a static width up to
    ``PERSISTENT_ROW_LIMIT`` are persistent (the row in registers, read once)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:
        """Its identity in the compile cache's key (newer torch asks a choices class for it)."""
        return f"{__name__}.{type(self).__name__}:{PERSISTENT_ROW_LIMIT}"


def _fp8_attention(t: torch.nn.Module) -> None:
    fp8.enable_fp8_attention(t, fp8.fa3_flash_attn_func())


def _fp8_linears(t: torch.nn.Module) -> None:
    fp8.quantize_block_linears(t)
    fp8.use_sigmoid_gelu(t)
    fp8.fuse_gelu_into_float8_ffns(t)


def _fp8(t: torch.nn.Module) -> None:
    """What ``accel.apply_precision`` does under ``PRECISION=fp8``."""
    _fp8_linears(t)
    _fp8_attention(t)


def _fp8_unfused_ffn(t: torch.nn.Module) -> None:
    """The FFN's GELU compiled and its output quantized by torchao's down projection (up to run 38)."""
    fp8.quantize_block_linears(t)
    fp8.use_sigmoid_gelu(t)
    _fp8_attention(t)


def _fp8_tanh_gelu(t: torch.nn.Module) -> None:
    """The fp8 set-up without the sigmoid-form GELU (as it was up to runs 29 and 30)."""
    fp8.quantize_block_linears(t)
    _fp8_attention(t)


def _fp8_max_qk(t: torch.nn.Module) -> None:
    """Q and K scaled by their maximum over tokens, not by their norms' bound (up to run 32)."""
    _fp8(t)
    for module in fp8.self_attention_modules(t):
        module.processor.bounded_qk = False


def _fp8_tensorwise(t: torch.nn.Module) -> None:
    """One scale per tensor instead of per row for the linears."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
    quantize_(t, config, filter_fn=fp8._block_linear)
    fp8.use_sigmoid_gelu(t)
    _fp8_attention(t)


def _fp8_fused_qkv(t: torch.nn.Module) -> None:
    t.fuse_qkv_projections()
    _fp8(t)


@dataclass(frozen=True)
class Variant:
    """A set-up applied to a bf16 FA3 transformer before compile, and the compile's mode or
    inductor options (fp8 variants take the worker's ``fp8.INDUCTOR_OPTIONS`` unless they say)."""

    setup: Callable[[torch.nn.Module], None]
    mode: str | None = None
    options: dict[str, Any] | None = None
    #: compile with ``WideRowChoices`` (single-pass reductions over 1536-wide rows)
    wide_rows: bool = False


FP8 = fp8.INDUCTOR_OPTIONS
VARIANTS: dict[str, Variant] = {
    "bf16": Variant(lambda t: None),
    "fp8": Variant(_fp8, options=FP8),
    # without the coordinate-descent tuning: its compile time counts only as the first fp8 variant of a
    # run (later ones find the kernels they share in the cache)
    "fp8_default_inductor": Variant(_fp8),
    "fp8_unfused_ffn": Variant(_fp8_unfused_ffn, options=FP8),
    "fp8_tanh_gelu": Variant(_fp8_tanh_gelu, options=FP8),
    "fp8_max_qk": Variant(_fp8_max_qk, options=FP8),
    "fp8_attention_only": Variant(_fp8_attention, options=FP8),
    "fp8_linears_only": Variant(_fp8_linears, options=FP8),
    "fp8_tensorwise": Variant(_fp8_tensorwise, options=FP8),
    "fp8_fused_qkv": Variant(_fp8_fused_qkv, options=FP8),
    "fp8_max_autotune": Variant(_fp8, options={**FP8, "max_autotune": True}),
    "fp8_multi_kernel": Variant(_fp8, options={**FP8, "triton.multi_kernel": 1}),
    "fp8_wide_rows": Variant(_fp8, options=FP8, wide_rows=True),
    "bf16_wide_rows": Variant(lambda t: None, wide_rows=True),
}


def _family(name: str) -> str:
    n = name.lower()
    if n.startswith(("triton", "_gelu_quant")):
        return "triton (fused elementwise, reductions, quantization)"
    if "flash" in n or "fmha" in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "sm90_xmma", "cublas", "wgmma")):
        return "matmul"
    return "other"


def profile(transformer: torch.nn.Module, inputs: dict) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with torch.inference_mode(), torch_profile(activities=[activity]) as prof:
        transformer(**inputs)
        sync()
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


def build(name: str, base: torch.nn.Module, inputs: dict, ref: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """A variant's transformer, set up and compiled by its first call; what that call showed."""
    from torch._dynamo.utils import counters

    variant = VARIANTS[name]
    graphs_before = counters["stats"]["unique_graphs"]
    transformer = copy.deepcopy(base)
    variant.setup(transformer)
    errors: dict[str, str] = {}
    options = variant.options
    if variant.wide_rows:  # the setting also keys the compile cache, so no kernel is shared with the default
        options = {**(options or {}), "inductor_choices_class": WideRowChoices}
    # this thread's heuristics for the variant's compile, at its first call below
    V.set_choices_handler(WideRowChoices() if variant.wide_rows else InductorChoices())
    accel.compile_blocks(transformer, errors, mode=variant.mode, options=options)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        first = transformer(**inputs)[0]
        sync()
    info: dict[str, Any] = {"first_call_s": round(time.perf_counter() - started, 2)}
    info["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
    info["rel_err_vs_eager_bf16"] = round(float((first.float() - ref).norm() / ref.norm()), 4)
    if errors:
        info["compile_errors"] = errors
    return transformer, info


def time_in_rounds(models: dict[str, torch.nn.Module], inputs: dict, reps: int) -> dict[str, list[float]]:
    """``reps`` rounds of one forward per model, in the same order each round (seconds)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(reps):
            for name, transformer in models.items():
                sync()
                started = time.perf_counter()
                transformer(**inputs)
                sync()
                times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", default="bf16,fp8", help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--profile", default="bf16,fp8")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=832)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself (bf16 only)")
    p.add_argument("--out")
    args = p.parse_args()

    torch.manual_seed(0)
    base = accel_ready(args.layers, args.device)
    inputs = accel.transformer_dummy_inputs(base, args.height, args.width, args.frames, args.device)
    with torch.inference_mode():
        ref = base(**inputs)[0].float()
    result: dict[str, Any] = {"versions": versions(), "layers": args.layers}
    result.update(shape=[args.frames, args.height, args.width], variants={})
    models: dict[str, torch.nn.Module] = {}
    for name in args.variants.split(","):
        try:
            models[name], result["variants"][name] = build(name, base, inputs, ref)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            result["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            torch.cuda.empty_cache()
        print(name, json.dumps(result["variants"][name]), flush=True)
    for name, seconds in time_in_rounds(models, inputs, args.reps).items():
        ordered = sorted(seconds)
        forward = {
            "forward_ms": round(ordered[len(ordered) // 2] * 1e3, 2),
            "forward_ms_min": round(ordered[0] * 1e3, 2),
        }
        result["variants"][name].update(forward)
        print(name, json.dumps(forward), flush=True)
    for name in args.profile.split(","):
        if name in models:
            result["variants"][name]["profile"] = profile(models[name], inputs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def accel_ready(layers: int, device: str) -> torch.nn.Module:
    """The real-width transformer with ``layers`` blocks, bf16 on ``device``, FA3 as its backend where it loads."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**{**WAN_TRANSFORMER, "num_layers": layers}).to(device, torch.bfloat16).eval()
    keep = transformer._keep_in_fp32_modules  # as from_pretrained(torch_dtype=bfloat16) leaves them
    for name, param in transformer.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    if patches.enable_fa3():
        transformer.set_attention_backend("_flash_3")
    return transformer


if __name__ == "__main__":
    main()
