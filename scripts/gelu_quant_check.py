"""The fused FFN kernel alone (GPU only): ``fp8.gelu_quant_rows`` (the Triton kernel), called
eagerly and from a compiled graph, against its reference and against inductor's kernel for
the same work, at the job's FFN shape (32,760 x 8,960).

usage (from the repository root): bash scripts/device_bench.sh --script scripts/gelu_quant_check.py
(or PYTHONPATH=.:src python scripts/gelu_quant_check.py)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wan_worker.runtime import fp8


def gpu_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Mean time of ``fn`` on the GPU's clock, after one call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def inductor_form(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the compiled graph did before: the sigmoid-form GELU in bf16, then torchao's per-row quantization."""
    g = fp8.sigmoid_gelu(x)
    descale = g.abs().amax(dim=-1, keepdim=True).float() / fp8.FP8_MAX
    return (g.float() / descale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(torch.float8_e4m3fn), descale


def main() -> None:
    x = (torch.randn(32760, 8960, device="cuda") * 2).bfloat16()
    exact = F.gelu(x.float(), approximate="tanh")
    result: dict[str, float] = {}
    compiled_op = torch.compile(fp8.gelu_quant_rows, fullgraph=True)  # as the blocks' graphs call it
    kernels = [("kernel", fp8.gelu_quant_rows), ("compiled", compiled_op), ("reference", fp8.gelu_quant_rows_reference)]
    for name, fn in kernels:
        q, descale = fn(x)
        result[f"{name}_rel_err_vs_exact_gelu"] = float((q.float() * descale - exact).norm() / exact.norm())
        result[f"{name}_descale_sum"] = float(descale.double().sum())
    compiled = torch.compile(inductor_form, options=fp8.INDUCTOR_OPTIONS)
    started = time.perf_counter()
    compiled(x)
    result["inductor_compile_s"] = round(time.perf_counter() - started, 1)
    result["kernel_ms"] = gpu_ms(lambda: fp8.gelu_quant_rows(x))
    result["compiled_kernel_ms"] = gpu_ms(lambda: compiled_op(x))
    result["inductor_ms"] = gpu_ms(lambda: compiled(x))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
