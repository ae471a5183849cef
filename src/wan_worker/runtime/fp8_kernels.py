"""Triton kernels of ``PRECISION=fp8`` (imported by ``fp8`` only on a CUDA device, where
Triton is; the numbers they use come from ``fp8`` as arguments, so this module imports none of it).

``gelu_quant_rows`` is a ``torch.library.triton_op``: ``torch.compile`` traces through it and
inductor calls the kernel directly, with no eager dispatch in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _sigmoid_gelu(x, gelu_2c: tl.constexpr):
    """tanh-GELU as ``x * sigmoid(2z)`` = ``x / (1 + exp(-2z))``, with the fast division."""
    two_z = x * (gelu_2c * (1.0 + 0.044715 * x * x))
    return tl.math.fdiv(x, 1.0 + tl.exp(-two_z), ieee_rounding=False)


@triton.jit
def _quantize(g, inv_scale, fp8_max: tl.constexpr):
    return tl.clamp(g * inv_scale, -fp8_max, fp8_max).to(tl.float8e4nv)


@triton.jit
def _gelu_quant_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_cols,
    fp8_max: tl.constexpr,
    gelu_2c: tl.constexpr,
    amax_floor: tl.constexpr,
    block_a: tl.constexpr,
    block_b: tl.constexpr,
):
    """One row per program, read once: the row is held in registers as two power-of-two
    pieces (8960 = 8192 + 768 of 1024), so the GELU is evaluated once per element and the
    row's maximum and its quantization come from the same registers."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    q_row = q_ptr + row * n_cols
    cols_a = tl.arange(0, block_a)
    cols_b = block_a + tl.arange(0, block_b)
    mask_a = cols_a < n_cols
    mask_b = cols_b < n_cols
    a = _sigmoid_gelu(tl.load(x_row + cols_a, mask=mask_a, other=0.0).to(tl.float32), gelu_2c)
    b = _sigmoid_gelu(tl.load(x_row + cols_b, mask=mask_b, other=0.0).to(tl.float32), gelu_2c)
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
    amax = tl.maximum(amax, amax_floor)
    tl.store(scale_ptr + row, amax / fp8_max)
    inv_scale = fp8_max / amax
    tl.store(q_row + cols_a, _quantize(a, inv_scale, fp8_max), mask=mask_a)
    tl.store(q_row + cols_b, _quantize(b, inv_scale, fp8_max), mask=mask_b)


def _pieces(n_cols: int) -> tuple[int, int]:
    """The two power-of-two widths that cover a row: the largest that fits, then the rest."""
    block_a = 1 << (n_cols.bit_length() - 1)
    rest = n_cols - block_a
    return block_a, max(16, triton.next_power_of_2(rest)) if rest else 16


@triton_op("wan_worker::gelu_quant_rows", mutates_args={})
def gelu_quant_rows(
    x: torch.Tensor, fp8_max: float, gelu_2c: float, amax_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bf16 -> (float8_e4m3fn GELU(x), (rows, 1) float32 descale); see
    ``fp8.gelu_quant_rows_reference`` for the contract and ``fp8.gelu_quant_rows`` for the numbers."""
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block_a, block_b = _pieces(cols)
    wrap_triton(_gelu_quant_rows_kernel)[(rows,)](
        x, q, scale, cols, fp8_max, gelu_2c, amax_floor, block_a=block_a, block_b=block_b, num_warps=8
    )
    return q, scale
