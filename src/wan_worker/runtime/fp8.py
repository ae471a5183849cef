"""``PRECISION=fp8``: FP8 self-attention (FlashAttention-3) and float8 linears (torchao).

* **Self-attention** (each block's ``attn1``, 70 % of the FLOPs at 480x832x81) runs FA3's FP8
  kernel. Q, K and V are quantized to ``float8_e4m3fn`` with one scale per (batch, head):
  V's from its absolute maximum over tokens and channels, Q's and K's from a bound (below);
  FA3 takes the scales back as float32
  ``q_descale/k_descale/v_descale`` of shape (B, H) and returns bf16. K is first **smoothed**:
  its mean over tokens is subtracted. That is exact for softmax attention (it shifts every
  score of one query by the same ``q . mean(k)``) and removes the per-channel offset that
  would otherwise set K's scale and waste its few mantissa bits. Cross-attention (512 text
  tokens, a few percent of the time) stays bf16.
* **Q and K need no run-time maximum.** Both come out of an RMSNorm over all heads' channels
  (N = 1536), and an RMS-normalized vector has no element above sqrt(N) times the norm's
  weight; the rotary embedding only rotates pairs of channels, which keeps each pair's length.
  So ``norm_bound`` gives each head a fixed bound from the norm's weight, and Q and K are
  scaled by it: no pass over 32,760 tokens for a maximum, and Q's norm, rotation and
  quantization fuse into one kernel (K still needs its token mean, for the smoothing). A
  bound looser than the actual maximum costs no precision in a floating-point format as long
  as values stay in e4m3's normal range, which starts 2^15 below its maximum. V (no norm)
  keeps its maximum per head.
* **Linears** of the transformer blocks: torchao's dynamic float8 activations and float8
  weights with one scale per row (``Float8DynamicActivationFloat8WeightConfig(PerRow())``).
* **The FFN's tanh GELU** and the per-row float8 quantization of its output run as one
  Triton kernel (``fp8_kernels.gelu_quant_rows``, ``fuse_gelu_into_float8_ffns``) that reads
  each 8960-wide row once, evaluates the GELU once per element as ``x * sigmoid(2z)`` (the
  same function as ``0.5 x (1 + tanh(z))``, with the fast ``exp``) and quantizes it from
  registers; the float8 down projection then takes it as is. Inductor's kernel for the same
  work read each row twice and evaluated the GELU on both reads: 0.57 against 0.31 ms a
  layer. Where the fused FFN does not apply (LoRA slots on the down projection), the GELU
  is still compiled in the sigmoid form (``use_sigmoid_gelu``).

The attention runs through ``FP8SelfAttnProcessor``, set with diffusers' own
``set_processor`` on the ``attn1`` modules only; ``disable_fp8_attention`` puts the
original processors back. Both need a Hopper GPU (FA3's FP8 kernels are sm_90), the
``fa3-fwd`` wheel and torchao: ``unavailable_reason`` says which one is missing, and the
caller (``accel.apply_precision``) then runs bf16 and says so.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Prefixes of the transformer's repeated blocks (T2V and VACE) whose linears go float8.
BLOCK_PREFIXES = ("blocks", "vace_blocks")
#: The inductor settings torchao's float8 set-up applies process-wide by default (its
#: ``recommended_inductor_config_setter``, never undone), which made every later compile of
#: the process (the VAE's, Qwen's) tune its kernels too: the VAE's warm-up went from 16 s to
#: 85 s. The set-up now leaves the process alone, and the blocks' compile takes these
#: settings itself: the fp8 numbers were measured with them.
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}


# -- quantization (pure torch; runs on CPU too) ------------------------------------------------


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> float8_e4m3fn values and their float32 descale of shape (B, H).

    ``x ~= x8.float() * descale[:, None, :, None]``; each (batch, head) slice uses the whole
    e4m3 range: its absolute maximum maps to 448.
    """
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-8)
    descale = amax / FP8_MAX
    x8 = (x.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, descale


def quantize_to_bound(x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> float8_e4m3fn values and their (B, H) descale, from a per-head bound (H,)
    on ``|x|`` known in advance: the same contract as ``quantize_per_head``, with no reduction."""
    descale = (bound.float().clamp(min=1e-8) / FP8_MAX).expand(x.shape[0], -1).contiguous()
    x8 = (x.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, descale


#: Headroom over ``norm_bound``'s exact bound for the norm's own rounding (bf16: 2^-8).
BOUND_MARGIN = 1.02


def norm_bound(norm: torch.nn.Module, heads: int) -> torch.Tensor | None:
    """A per-head bound (H,) on ``|rotate(norm(x))|`` for any x, or None when ``norm`` is not an
    RMSNorm with a weight whose channels split evenly into ``heads``.

    RMSNorm gives ``y_c = x_c / rms(x) * w_c`` with ``rms(x)^2 = sum(x^2) / N``, and no
    ``x_c^2`` exceeds ``sum(x^2)``, so ``|y_c| <= sqrt(N) |w_c|``; the same holds for the length
    of a pair of channels, which is all the rotary embedding can move into one channel. Read
    from the weight at each call, so a changed weight changes the bound.
    """
    if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None or norm.weight.numel() % heads:
        return None
    per_head = norm.weight.detach().float().abs().reshape(heads, -1).amax(dim=1)
    return per_head * (math.sqrt(norm.weight.numel()) * BOUND_MARGIN)


#: Per-head bounds on |Q| and |K| (``qk_bounds``), or None: scale by the maximum instead.
QKBounds = tuple[torch.Tensor, torch.Tensor] | None


def qk_bounds(attn: torch.nn.Module) -> QKBounds:
    """``norm_bound`` of an attention module's Q and K norms, or None unless both have one."""
    q_bound, k_bound = norm_bound(attn.norm_q, attn.heads), norm_bound(attn.norm_k, attn.heads)
    return None if q_bound is None or k_bound is None else (q_bound, k_bound)


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over tokens (dim 1): softmax(q k^T) is unchanged, K's range shrinks."""
    mean = k.mean(dim=1, keepdim=True, dtype=torch.promote_types(k.dtype, torch.float32))
    return (k - mean).to(k.dtype)


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: QKBounds = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA3's FP8 inputs: (q8, k8, v8, q_descale, k_descale, v_descale), K smoothed.

    Q and K are scaled by their per-head ``bounds`` when given, else by their maximum;
    smoothing can at most double K's bound (``|k - mean| <= |k| + |mean|``).
    """
    smoothed = smooth_keys(k)
    if bounds is None:
        (q8, qd), (k8, kd) = quantize_per_head(q), quantize_per_head(smoothed)
    else:
        (q8, qd), (k8, kd) = quantize_to_bound(q, bounds[0]), quantize_to_bound(smoothed, 2.0 * bounds[1])
    v8, vd = quantize_per_head(v)
    return q8, k8, v8, qd, kd, vd


def dequantize(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return x8.float() * descale[:, None, :, None]


def reference_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: QKBounds = None) -> torch.Tensor:
    """What FA3 computes from ``quantize_qkv``'s inputs, in plain torch (float32 softmax):
    the yardstick for the quantization itself, on any device."""
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, bounds)
    qf, kf, vf = (dequantize(x, d).transpose(1, 2) for x, d in ((q8, qd), (k8, kd), (v8, vd)))
    out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)
    return out.transpose(1, 2).to(torch.bfloat16)


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flash_attn_func: Callable, bounds: QKBounds = None
) -> torch.Tensor:
    """Self-attention of (B, S, H, D) tensors through FA3's FP8 kernel; bf16 out."""
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, bounds)
    out = flash_attn_func(q8, k8, v8, softmax_scale=q.shape[-1] ** -0.5, q_descale=qd, k_descale=kd, v_descale=vd)
    return out[0] if isinstance(out, tuple) else out


# -- availability ---------------------------------------------------------------------------------


def fa3_flash_attn_func() -> Callable | None:
    """FA3's ``flash_attn_func`` from ``flash_attn_interface`` or the ``fa3-fwd`` wheel; None if absent."""
    for module_name in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            if module_name == "fa3_fwd_interface" and "flash_attn_config" not in sys.modules:
                # the forward-only wheel renamed its config module but one helper imports the old name
                sys.modules["flash_attn_config"] = importlib.import_module("fa3_fwd_config")
            return importlib.import_module(module_name).flash_attn_func
        except Exception:  # noqa: BLE001 - absent or built for another torch: no FA3
            continue
    return None


def unavailable_reason() -> str | None:
    """Why FP8 can't run here (None: it can): no CUDA, not Hopper, no FA3 wheel, no torchao, or
    a probe of either that fails on this GPU."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        name = torch.cuda.get_device_name()
        return f"{name} is sm_{major}{minor}; FA3's FP8 attention kernels need a Hopper GPU (sm_90)"
    if fa3_flash_attn_func() is None:
        return "FlashAttention-3 is not installed (the fa3-fwd wheel, module fa3_fwd_interface)"
    try:
        importlib.import_module("torchao.quantization")
    except Exception as exc:  # noqa: BLE001 - absent, or built for another torch
        return f"torchao is not usable: {type(exc).__name__}: {str(exc)[:160]}"
    return probe_attention(fa3_flash_attn_func(), "cuda") or probe_linear("cuda") or probe_gelu_quant("cuda")


def probe_attention(flash_attn_func: Callable, device: str) -> str | None:
    """One small FP8 attention call against ``reference_fp8_attention``: a kernel that fails
    or disagrees on this GPU (a wheel built for another torch, other descale semantics) is
    found at load time, not inside the warm-up or a job. None when it agrees."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 256, 2, 128, generator=gen, device=device).bfloat16() for _ in range(3))
        out = fp8_attention(q, k, v, flash_attn_func).float()
        ref = reference_fp8_attention(q, k, v).float()
        err = float((out - ref).norm() / ref.norm())
    except Exception as exc:  # noqa: BLE001 - any failure means: not here
        return f"FA3 FP8 attention failed here: {type(exc).__name__}: {str(exc)[:160]}"
    return None if err < 0.05 else f"FA3 FP8 attention disagrees with its reference here (relative error {err:.3f})"


def probe_linear(device: str) -> str | None:
    """One small torchao float8 linear: torchao built for another torch fails here, not in a job."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        layer = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(device, torch.bfloat16)
        quantize_(layer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
        with torch.inference_mode():
            layer(torch.randn(64, 256, device=device, dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001 - any failure means: not here
        return f"torchao float8 linears failed here: {type(exc).__name__}: {str(exc)[:160]}"
    return None


def probe_gelu_quant(device: str) -> str | None:
    """The fused FFN's kernel on a few rows against ``gelu_quant_rows_reference``: a Triton that
    can't build it here is found at load time, not inside the warm-up or a job."""
    try:
        x = torch.randn(64, 8960, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
        out, ref = (q.float() * descale for q, descale in (gelu_quant_rows(x), gelu_quant_rows_reference(x)))
        err = float((out - ref).norm() / ref.norm())
    except Exception as exc:  # noqa: BLE001 - any failure means: not here
        return f"the fused GELU + float8 kernel failed here: {type(exc).__name__}: {str(exc)[:160]}"
    return (
        None
        if err < 0.01
        else f"the fused GELU + float8 kernel disagrees with its reference here (relative error {err:.3f})"
    )


# -- the transformer -------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, the arithmetic of diffusers'
    ``WanAttnProcessor``, written as one pointwise expression (no strided writes into an empty
    tensor) and left in the tables' float32: the quantization that follows fuses into it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class FP8SelfAttnProcessor:
    """Wan self-attention with FP8 attention; anything else goes to the original processor.

    The projections, QK norms, rotary embedding and output projection are those of diffusers'
    ``WanAttnProcessor``; only the attention call differs.
    """

    _attention_backend = None  # set by ``set_attention_backend``; this processor uses FA3 FP8
    _parallel_config = None
    #: Scale Q and K by ``norm_bound`` (True) or by their maximum over tokens (False: the
    #: set-up measured before the bound; kept for the probe's comparison).
    bounded_qk = True

    def __init__(self, flash_attn_func: Callable, original: Any) -> None:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        self.flash_attn_func = flash_attn_func
        self.original = original
        self.qkv_projections = _get_qkv_projections  # separate or fused QKV, as diffusers does it

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = self.qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        bounds = qk_bounds(attn) if self.bounded_qk else None
        out = fp8_attention(query, key, value, self.flash_attn_func, bounds)
        out = out.flatten(2, 3).type_as(value)
        return attn.to_out[1](attn.to_out[0](out))


def self_attention_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block's ``attn1`` (T2V and VACE blocks alike)."""
    return [m for name, m in transformer.named_modules() if name.rsplit(".", 1)[-1] == "attn1"]


def enable_fp8_attention(transformer: torch.nn.Module, flash_attn_func: Callable) -> int:
    """Give every ``attn1`` the FP8 processor (idempotent); the number of modules changed."""
    count = 0
    for module in self_attention_modules(transformer):
        if not isinstance(module.processor, FP8SelfAttnProcessor):
            module.set_processor(FP8SelfAttnProcessor(flash_attn_func, module.processor))
            count += 1
    return count


def disable_fp8_attention(transformer: torch.nn.Module) -> int:
    """Put the original processors back; the number of modules restored."""
    count = 0
    for module in self_attention_modules(transformer):
        if isinstance(module.processor, FP8SelfAttnProcessor):
            module.set_processor(module.processor.original)
            count += 1
    return count


def _block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """A Linear inside a repeated block whose sizes float8 matmuls accept (multiples of 16).

    LoRA slot weights (``lora_A``/``lora_B``) stay bf16: jobs hot-swap new values into them.
    """
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.split(".", 1)[0] in BLOCK_PREFIXES
        and ".lora_" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def quantize_block_linears(transformer: torch.nn.Module) -> int:
    """torchao float8 (dynamic activations, per-row weights) for the blocks' linears; the count."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(1 for fqn, m in transformer.named_modules() if _block_linear(m, fqn))
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=_block_linear)
    return count


def float8_linear_count(transformer: torch.nn.Module) -> int:
    """Linears whose weight torchao has made float8 (its ``Float8Tensor`` keeps ``qdata``; its
    ``dtype`` still reads bf16): what a failed set-up leaves behind."""
    return sum(1 for m in transformer.modules() if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata"))


#: tanh-GELU's coefficient of z, sqrt(2 / pi), doubled for the sigmoid form
GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")``, written as ``x * sigmoid(2z)`` when compiled.

    0.5 (1 + tanh z) = sigmoid(2z): the same function (the last bit of rounding aside). Eager
    calls keep ``F.gelu``: one kernel, where the sigmoid form would be several with float32
    temporaries of the FFN's full width.
    """
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.sigmoid(GELU_2C * xf * (1.0 + 0.044715 * xf * xf))).to(x.dtype)


def use_sigmoid_gelu(transformer: torch.nn.Module) -> int:
    """Give every tanh ``GELU`` of the blocks' FFNs ``sigmoid_gelu`` (idempotent); the number changed."""
    from diffusers.models.activations import GELU

    count = 0
    for fqn, module in transformer.named_modules():
        swap = isinstance(module, GELU) and module.approximate == "tanh" and fqn.split(".", 1)[0] in BLOCK_PREFIXES
        if swap and vars(module).get("gelu") is not sigmoid_gelu:
            module.gelu = sigmoid_gelu
            count += 1
    return count


# -- the FFN: GELU and its quantization in one pass ------------------------------------------------

#: The least row maximum a GELU row is scaled by, so an all-zero row stays finite.
ROW_AMAX_FLOOR = 1e-12


def gelu_quant_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> float8_e4m3fn tanh-GELU(x) and its float32 descale of shape (rows, 1).

    ``GELU(x) ~= q.float() * descale``; each row's absolute maximum maps to 448, as torchao's
    per-row activation scaling does. The contract of the Triton kernel in ``fp8_kernels``.
    """
    g = F.gelu(x.float(), approximate="tanh")
    amax = g.abs().amax(dim=-1, keepdim=True).clamp(min=ROW_AMAX_FLOOR)
    q = (g * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_MAX


def gelu_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu_quant_rows_reference``'s result; on a GPU from one Triton kernel that reads each row once."""
    if x.is_cuda:
        from wan_worker.runtime.fp8_kernels import gelu_quant_rows as kernel

        return kernel(x, FP8_MAX, GELU_2C, ROW_AMAX_FLOOR)
    return gelu_quant_rows_reference(x)


def rowwise_scaled_mm(
    q: torch.Tensor, descale: torch.Tensor, w8: torch.Tensor, w_descale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``(q * descale) @ (w8 * w_descale.T).T + bias`` in bf16: (M, K) fp8 rows with (M, 1)
    descales times an (N, K) fp8 weight with (1, N) descales, as torchao's per-row linears
    call ``torch._scaled_mm``. Off the GPU, the same product dequantized."""
    if q.is_cuda:
        return torch._scaled_mm(
            q, w8.t(), scale_a=descale, scale_b=w_descale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
        )
    out = (q.float() * descale) @ (w8.float() * w_descale.t()).t()
    return (out if bias is None else out + bias.float()).to(torch.bfloat16)


def _fusable_ffn(module: torch.nn.Module, fqn: str) -> bool:
    """A blocks' diffusers ``FeedForward``: tanh GELU, dropouts of 0, and a float8 down projection
    whose weight torchao quantized per row (``qdata``, ``scale``)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    if type(module) is not FeedForward or fqn.split(".", 1)[0] not in BLOCK_PREFIXES:
        return False
    gelu, *dropouts, down = module.net
    return (
        isinstance(gelu, GELU)
        and gelu.approximate == "tanh"
        and all(isinstance(d, torch.nn.Dropout) and d.p == 0 for d in dropouts)
        and type(down) is torch.nn.Linear
        and hasattr(down.weight, "qdata")
        and getattr(down.weight, "scale", None) is not None
        and down.weight.scale.numel() == down.out_features
    )


@functools.cache
def fused_ffn_class() -> type:
    """The FFN class with the fused GELU, built on first use so importing this module does not
    import diffusers."""
    from diffusers.models.attention import FeedForward

    class FusedGeluFloat8FeedForward(FeedForward):
        """The FFN as ``up (float8) -> GELU + per-row quantization (one kernel) -> down (float8)``.

        torchao's down projection would quantize the GELU's bf16 output itself, in a kernel
        that reads each 8960-wide row twice and evaluates the GELU on both reads; here the
        GELU's output goes to float8 from registers. The down projection's float8 weight and
        descales are torchao's own tensors (no copy), held as buffers so that every block's
        compiled forward is one graph. If LoRA slots later wrap the down projection, the FFN
        runs diffusers' forward again.
        """

        float8_down_weight: torch.Tensor
        float8_down_descale: torch.Tensor

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            up, down = self.net[0].proj, self.net[-1]
            if type(down) is not torch.nn.Linear:
                return super().forward(hidden_states, *args, **kwargs)
            h = up(hidden_states)
            q, descale = gelu_quant_rows(h.reshape(-1, h.shape[-1]))
            out = rowwise_scaled_mm(q, descale, self.float8_down_weight, self.float8_down_descale, down.bias)
            return out.reshape(*h.shape[:-1], out.shape[-1]).to(h.dtype)

    return FusedGeluFloat8FeedForward


def fuse_gelu_into_float8_ffns(transformer: torch.nn.Module) -> int:
    """Make every float8 FFN of the blocks a ``fused_ffn_class()`` (idempotent; after
    ``quantize_block_linears``); the number changed. Module names and state dicts are unchanged."""
    count = 0
    for fqn, module in transformer.named_modules():
        if _fusable_ffn(module, fqn):
            weight = module.net[-1].weight
            module.register_buffer("float8_down_weight", weight.qdata, persistent=False)
            module.register_buffer("float8_down_descale", weight.scale.float().reshape(1, -1), persistent=False)
            module.__class__ = fused_ffn_class()
            count += 1
    return count
