"""Triton kernels of ``PRECISION=fp8`` (imported only on a CUDA device, where Triton is).

``gelu_quant_rows`` is a ``torch.library.triton_op``: ``torch.compile`` traces through it and
inductor calls the kernel directly, with no eager dispatch in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from wan_worker.runtime import fp8

# Triton kernels read module globals only as constexprs
_FP8_MAX = tl.constexpr(fp8.FP8_MAX)
_GELU_2C = tl.constexpr(fp8.GELU_2C)
_ROW_AMAX_FLOOR = tl.constexpr(fp8.ROW_AMAX_FLOOR)


@triton.jit
def _sigmoid_gelu(x):
    """tanh-GELU as ``x * sigmoid(2z)`` = ``x / (1 + exp(-2z))``, with the fast division."""
    two_z = x * (_GELU_2C * (1.0 + 0.044715 * x * x))
    return tl.math.fdiv(x, 1.0 + tl.exp(-two_z), ieee_rounding=False)


@triton.jit
def _quantize(g, inv_scale):
    return tl.clamp(g * inv_scale, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)


@triton.jit
def _gelu_quant_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, block_a: tl.constexpr, block_b: tl.constexpr):
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
    a = _sigmoid_gelu(tl.load(x_row + cols_a, mask=mask_a, other=0.0).to(tl.float32))
    b = _sigmoid_gelu(tl.load(x_row + cols_b, mask=mask_b, other=0.0).to(tl.float32))
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
    amax = tl.maximum(amax, _ROW_AMAX_FLOOR)
    tl.store(scale_ptr + row, amax / _FP8_MAX)
    inv_scale = _FP8_MAX / amax
    tl.store(q_row + cols_a, _quantize(a, inv_scale), mask=mask_a)
    tl.store(q_row + cols_b, _quantize(b, inv_scale), mask=mask_b)


def _pieces(n_cols: int) -> tuple[int, int]:
    """The two power-of-two widths that cover a row: the largest that fits, then the rest."""
    block_a = 1 << (n_cols.bit_length() - 1)
    rest = n_cols - block_a
    return block_a, max(16, triton.next_power_of_2(rest)) if rest else 16


@triton_op("wan_worker::gelu_quant_rows", mutates_args={})
def gelu_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bf16 -> (float8_e4m3fn GELU(x), (rows, 1) float32 descale); see
    ``fp8.gelu_quant_rows_reference`` for the contract."""
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block_a, block_b = _pieces(cols)
    wrap_triton(_gelu_quant_rows_kernel)[(rows,)](x, q, scale, cols, block_a=block_a, block_b=block_b, num_warps=8)
    return q, scale
