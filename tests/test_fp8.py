"""PRECISION=fp8: the quantization math of the FP8 attention path (pure torch, CPU), the
processor's plumbing on a small Wan transformer, and the visible bf16 fallback."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers.inprocess import tiny_settings, tiny_worker

from wan_worker.runtime import accel, fp8


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on (B, S, H, D) tensors."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(seed: int = 0, b: int = 2, s: int = 256, h: int = 3, d: int = 64, key_offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=gen) for _ in range(3))
    # keys of trained models carry a large per-channel offset, the same for every token
    k = k + key_offset * torch.randn(b, 1, h, d, generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def test_per_head_scales_use_the_whole_fp8_range():
    q, _, _ = qkv()
    q[1, :, 2] *= 50  # one (batch, head) slice far larger than the rest
    q8, descale = fp8.quantize_per_head(q)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == q.shape
    assert descale.dtype == torch.float32 and descale.shape == (2, 3)
    amax = q.float().abs().amax(dim=(1, 3))
    torch.testing.assert_close(descale, amax / fp8.FP8_MAX)
    assert torch.equal(q8.float().abs().amax(dim=(1, 3)), torch.full((2, 3), fp8.FP8_MAX))
    back = fp8.dequantize(q8, descale)
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of itself (or of the smallest normal)
    err = (back - q.float()).abs()
    assert bool((err <= q.float().abs() / 16 + descale[:, None, :, None] * 2**-6).all())
    assert rel_err(back, q) < 0.04
    # the large slice did not coarsen the others (per-head, not per-tensor, scales)
    assert rel_err(back[0], q[0]) < 0.04


def test_key_smoothing_is_exact_for_softmax_attention():
    q, k, v = (t.double() for t in qkv(key_offset=8.0))
    smoothed = fp8.smooth_keys(k)
    assert smoothed.mean(dim=1).abs().max() < 1e-10
    torch.testing.assert_close(attention(q, smoothed, v), attention(q, k, v), rtol=1e-9, atol=1e-9)


def test_fp8_attention_matches_bf16_sdpa_and_smoothing_helps():
    q, k, v = qkv(seed=1, key_offset=8.0)
    exact = attention(q.float(), k.float(), v.float())
    bf16 = attention(q, k, v)
    ours = fp8.reference_fp8_attention(q, k, v)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert rel_err(bf16, exact) < 0.01
    smoothed_err = rel_err(ours, exact)
    assert smoothed_err < 0.06, smoothed_err

    # the same path without smoothing: K's offset sets its scale, the signal loses its bits
    q8, qd = fp8.quantize_per_head(q)
    k8, kd = fp8.quantize_per_head(k)
    v8, vd = fp8.quantize_per_head(v)
    unsmoothed = attention(fp8.dequantize(q8, qd), fp8.dequantize(k8, kd), fp8.dequantize(v8, vd))
    assert smoothed_err < rel_err(unsmoothed, exact) / 1.5


def normed_qk(seed: int = 0, b: int = 2, s: int = 256, h: int = 3, d: int = 64, key_offset: float = 0.0):
    """Q and K as a Wan block makes them: an RMSNorm over all heads' channels (random positive
    weights), then the rotary embedding; V plain. Returns (q, k, v, norm_q, norm_k)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [torch.nn.RMSNorm(h * d, eps=1e-6) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(h * d, generator=gen) * 2 + 0.1)
    xq = torch.randn(b, s, h * d, generator=gen)
    xk = torch.randn(b, s, h * d, generator=gen) + key_offset * torch.randn(1, 1, h * d, generator=gen)
    angle = (torch.arange(s)[None, :, None, None] * torch.rand(1, 1, 1, d // 2, generator=gen)).repeat_interleave(2, -1)
    with torch.no_grad():
        q, k = (
            fp8._rotate(n(x).unflatten(-1, (h, -1)), angle.cos(), angle.sin())
            for n, x in zip(norms, (xq, xk), strict=True)
        )
    v = torch.randn(b, s, h, d, generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), *norms


def test_rotation_is_diffusers_arithmetic():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    x = torch.randn(2, 16, 3, 8)
    cos, sin = torch.rand(1, 16, 1, 8), torch.rand(1, 16, 1, 8)

    def strided(x, cos, sin):  # diffusers' ``apply_rotary_emb`` inside ``WanAttnProcessor.__call__``
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(x)

    assert "apply_rotary_emb" in WanAttnProcessor.__call__.__code__.co_varnames  # still its shape there
    assert torch.equal(fp8._rotate(x, cos, sin), strided(x, cos, sin))


def test_norm_bound_holds_for_any_input_and_is_reached():
    heads, n = 4, 4 * 32
    norm = torch.nn.RMSNorm(n, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(n) * 3 + 0.1)
    bound = fp8.norm_bound(norm, heads)
    assert bound.shape == (heads,)
    # the worst inputs put all of a row's energy into one channel, or into one rotated pair
    one_hot = torch.eye(n) * 7.0
    pairs = torch.zeros(n // 2, n)
    pairs[torch.arange(n // 2), torch.arange(0, n, 2)] = pairs[torch.arange(n // 2), torch.arange(1, n, 2)] = 1.0
    x = torch.cat([one_hot, pairs, torch.randn(512, n) * 50])[None]
    angle = torch.rand(1, x.shape[1], 1, 16).repeat_interleave(2, -1) * 6.3
    with torch.no_grad():
        y = fp8._rotate(norm(x).unflatten(-1, (heads, -1)), angle.cos(), angle.sin())
    assert bool((y.abs().amax(dim=(0, 1, 3)) <= bound).all())
    # in bf16 (as the worker runs it) the norm's rounding stays inside the margin
    with torch.no_grad():
        norm16 = torch.nn.RMSNorm(n, eps=1e-6, dtype=torch.bfloat16)
        norm16.weight.copy_(norm.weight)
        y16 = fp8._rotate(norm16(x.bfloat16()).unflatten(-1, (heads, -1)), angle.cos(), angle.sin())
    assert bool((y16.float().abs().amax(dim=(0, 1, 3)) <= fp8.norm_bound(norm16, heads)).all())
    with torch.no_grad():
        unrotated = norm(one_hot[None]).unflatten(-1, (heads, -1))
    peak = unrotated.abs().amax(dim=(0, 1, 3))
    assert bool((peak >= bound / fp8.BOUND_MARGIN * 0.999).all())  # a one-hot row reaches it: no looser
    with torch.no_grad():
        norm.weight.mul_(2.0)
    torch.testing.assert_close(fp8.norm_bound(norm, heads), 2.0 * bound)  # read from the weight at each call
    assert fp8.norm_bound(torch.nn.LayerNorm(n), heads) is None
    assert fp8.norm_bound(torch.nn.RMSNorm(n, elementwise_affine=False), heads) is None  # falls back to the maximum
    assert fp8.norm_bound(norm, heads + 1) is None  # channels that don't split into heads: the maximum too
    q8, descale = fp8.quantize_to_bound(torch.ones(1, 2, heads, 32), torch.zeros(heads))  # an all-zero weight
    assert torch.isfinite(q8.float()).all() and bool((descale > 0).all())


def test_bounded_scales_are_as_accurate_as_the_maximum():
    for key_offset in (0.0, 4.0):
        q, k, v, norm_q, norm_k = normed_qk(seed=2, key_offset=key_offset)
        exact = attention(q.float(), k.float(), v.float())
        by_max = rel_err(fp8.reference_fp8_attention(q, k, v), exact)
        bounds = fp8.norm_bound(norm_q, 3), fp8.norm_bound(norm_k, 3)
        by_bound = rel_err(fp8.reference_fp8_attention(q, k, v, bounds), exact)
        assert by_bound < by_max * 1.05, (key_offset, by_bound, by_max)
        q8, qd = fp8.quantize_to_bound(q, bounds[0])
        assert qd.shape == (2, 3) and qd.dtype == torch.float32
        assert q8.float().abs().max() < fp8.FP8_MAX  # never clipped


def reference_flash_attn_func(calls: list):
    """FA3's FP8 contract in plain torch: float8 (B, S, H, D) inputs, float32 (B, H) descales,
    bf16 out. It records what it was given, so the test sees what the processor passes."""

    def flash_attn_func(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None):
        calls.append(
            {
                "dtypes": {q.dtype, k.dtype, v.dtype},
                "descale": (q_descale.dtype, tuple(q_descale.shape)),
                "descales": (q_descale, k_descale, v_descale),
            }
        )
        qf, kf, vf = (fp8.dequantize(x, d) for x, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        out = F.scaled_dot_product_attention(
            qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), scale=softmax_scale
        )
        return out.transpose(1, 2).to(torch.bfloat16)

    return flash_attn_func


def small_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 16, 16, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        return_dict=False,
    )
    return model, inputs


def test_processor_replaces_only_self_attention_and_is_removable():
    model, inputs = small_wan()
    with torch.no_grad():  # trained norms differ per channel: each head gets its own bound
        for block in model.blocks:
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                norm.weight.uniform_(0.2, 2.0)
    with torch.inference_mode():
        before = model(**inputs)[0]
    calls: list = []
    assert fp8.enable_fp8_attention(model, reference_flash_attn_func(calls)) == 2
    assert fp8.enable_fp8_attention(model, reference_flash_attn_func(calls)) == 0  # idempotent
    for block in model.blocks:
        assert isinstance(block.attn1.processor, fp8.FP8SelfAttnProcessor)
        assert not isinstance(block.attn2.processor, fp8.FP8SelfAttnProcessor)  # cross-attention stays
    with torch.inference_mode():
        quantized = model(**inputs)[0]
    assert len(calls) == 2  # one FP8 call per block: self-attention only
    assert calls[0]["dtypes"] == {torch.float8_e4m3fn} and calls[0]["descale"] == (torch.float32, (1, 2))
    # Q and K are scaled by their norms' bounds (K's doubled by the smoothing), not by a maximum
    attn = model.blocks[0].attn1
    q_descale, k_descale, _ = calls[0]["descales"]
    torch.testing.assert_close(q_descale[0], fp8.norm_bound(attn.norm_q, attn.heads) / fp8.FP8_MAX)
    assert q_descale[0, 0] != q_descale[0, 1]
    torch.testing.assert_close(k_descale[0], 2.0 * fp8.norm_bound(attn.norm_k, attn.heads) / fp8.FP8_MAX)
    assert torch.isfinite(quantized).all()
    assert rel_err(quantized, before) < 0.05
    assert not torch.equal(quantized, before)

    assert fp8.disable_fp8_attention(model) == 2
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs)[0], before)


def traced(fn, *args):
    """``fn`` through dynamo with ``fullgraph`` (eager backend): the graph's call targets and the output."""
    targets: list = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets, out


def test_sigmoid_gelu_compiles_to_the_sigmoid_form_of_the_same_function():
    x = torch.linspace(-12.0, 12.0, 20001)
    assert torch.equal(fp8.sigmoid_gelu(x), F.gelu(x, approximate="tanh"))  # eager: F.gelu itself, one kernel
    for dtype, tolerance in ((torch.float32, {"atol": 2e-6, "rtol": 1e-5}), (torch.bfloat16, {})):
        targets, out = traced(fp8.sigmoid_gelu, x.to(dtype))
        assert any("sigmoid" in t for t in targets) and not any("gelu" in t for t in targets)
        assert out.dtype == dtype  # float32 inside, rounded once
        torch.testing.assert_close(out, F.gelu(x.to(dtype).float(), approximate="tanh").to(dtype), **tolerance)


def test_use_sigmoid_gelu_swaps_the_blocks_ffn_gelus_once():
    from diffusers import WanVACETransformer3DModel

    model, inputs = small_wan()
    with torch.inference_mode():
        before = model(**inputs)[0]
    assert fp8.use_sigmoid_gelu(model) == 2  # one per block's FFN
    assert fp8.use_sigmoid_gelu(model) == 0  # idempotent
    assert all(block.ffn.net[0].gelu is fp8.sigmoid_gelu for block in model.blocks)
    # the text embedder's torch.nn.GELU(approximate="tanh") is outside the blocks and stays
    assert "gelu" not in vars(model.condition_embedder.text_embedder.act_1)
    with torch.inference_mode():
        assert torch.equal(model(**inputs)[0], before)  # eager calls are unchanged
    ffn = model.blocks[0].ffn
    hidden = torch.randn(1, 8, ffn.net[0].proj.in_features)
    targets, out = traced(ffn, hidden)
    assert any("sigmoid" in t for t in targets)
    with torch.inference_mode():
        torch.testing.assert_close(out, ffn(hidden), atol=1e-5, rtol=1e-4)

    vace = WanVACETransformer3DModel(**{**model.config, "vace_layers": [0], "vace_in_channels": 8})
    assert fp8.use_sigmoid_gelu(vace) == 3  # two blocks and one VACE block


def test_fp8_set_up_swaps_the_gelus_and_says_so(tiny_models, monkeypatch):
    monkeypatch.setattr(fp8, "unavailable_reason", lambda: None)  # as on a Hopper GPU with both wheels
    monkeypatch.setattr(fp8, "fa3_flash_attn_func", lambda: reference_flash_attn_func([]))
    monkeypatch.setattr(fp8, "quantize_block_linears", lambda transformer: 0)  # torchao's float8 needs a GPU
    worker = tiny_worker(tiny_models, precision="fp8")
    transformer = worker.manager.pipeline("t2v").transformer
    status = accel.precision_status(worker.manager.accel, worker.settings)
    assert status["applied"] == "fp8"
    assert status["modules"]["transformer"]["sigmoid_gelu"] == len(transformer.blocks)
    assert all(block.ffn.net[0].gelu is fp8.sigmoid_gelu for block in transformer.blocks)
    # the turbo transformer has the T2V one's class: each keeps its own entry, by role
    worker.manager.pipeline("turbo")
    worker.manager.pipeline("vace")
    status = accel.precision_status(worker.manager.accel, worker.settings)
    assert set(status["modules"]) == {"transformer", "turbo_transformer", "vace_transformer"}
    roles = [t["role"] for t in worker.manager.accel.as_dict()["transformers"]]
    assert roles == ["transformer", "turbo_transformer", "vace_transformer"]


def test_gelu_quant_rows_reference_is_the_gelu_quantized_per_row():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 8960, generator=gen) * torch.logspace(-2, 2, 64)[:, None]).bfloat16()
    x[3] = 0  # an all-zero row stays finite
    q, descale = fp8.gelu_quant_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert descale.dtype == torch.float32 and descale.shape == (64, 1)
    gelu = F.gelu(x.float(), approximate="tanh")
    rows = [i for i in range(64) if i != 3]
    # each row's largest magnitude maps to the top of e4m3's range
    assert torch.equal(q[rows].float().abs().amax(dim=1), torch.full((63,), fp8.FP8_MAX))
    assert torch.allclose(descale[rows, 0], gelu[rows].abs().amax(dim=1) / fp8.FP8_MAX)
    assert rel_err(q.float() * descale, gelu) < 0.04  # e4m3: 3 mantissa bits
    assert torch.isfinite(descale).all() and not q[3].float().any()


def float8_per_row(linear: torch.nn.Linear) -> None:
    """What torchao's per-row float8 conversion leaves on a linear (GPU only): the weight in
    float8_e4m3fn (``qdata``, out x in) and one float32 descale per output row (``scale``)."""
    w = linear.weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX
    linear.weight.qdata = (w / scale).to(torch.float8_e4m3fn)
    linear.weight.scale = scale


def block_graphs(model: torch.nn.Module) -> int:
    """The graphs dynamo builds when each block's forward is compiled as ``accel.compile_blocks``
    does it (eager backend): one unless something differs between blocks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        compiled = torch.compile(block.forward, backend="eager", fullgraph=True, dynamic=False)
        block.forward = compiled
    try:
        with torch.inference_mode():
            model(**small_wan()[1])
    finally:
        for block in model.blocks:
            del block.forward
    return counters["stats"]["unique_graphs"]


def test_fused_ffn_is_the_float8_ffn_and_steps_aside_for_lora_slots():
    from diffusers import WanVACETransformer3DModel

    model, inputs = small_wan()
    with torch.inference_mode():
        before = model(**inputs)[0]
        assert fp8.fuse_gelu_into_float8_ffns(model) == 0  # bf16 FFNs: nothing to fuse
        for block in model.blocks:
            float8_per_row(block.ffn.net[2])
        assert fp8.fuse_gelu_into_float8_ffns(model) == 2
        assert fp8.fuse_gelu_into_float8_ffns(model) == 0  # idempotent
        ffn = model.blocks[0].ffn
        hidden = torch.randn(1, 8, ffn.net[0].proj.in_features)
        up = ffn.net[0].proj(hidden).float()
        w = ffn.net[2].weight.qdata.float() * ffn.net[2].weight.scale
        expected = F.gelu(up, approximate="tanh") @ w.t() + ffn.net[2].bias.float()
        out = ffn(hidden)
        assert out.dtype == hidden.dtype and out.shape == (1, 8, ffn.net[2].out_features)
        assert rel_err(out, expected) < 0.05
        assert rel_err(model(**inputs)[0], before) < 0.05  # the whole transformer, two float8 FFNs
    _, compiled = traced(ffn, hidden)  # dynamo traces the fused forward without a break
    torch.testing.assert_close(compiled, out)
    assert block_graphs(model) == 1  # the blocks' compiled forwards share one graph, as unfused
    with torch.inference_mode():
        # LoRA slots wrap the down projection (peft): the FFN runs its original forward again
        class Wrapped(torch.nn.Module):
            def __init__(self, base: torch.nn.Linear) -> None:
                super().__init__()
                self.base_layer = base

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.base_layer(x) * 2

        ffn.net[2] = Wrapped(ffn.net[2])
        torch.testing.assert_close(ffn(hidden), ffn.net[2](ffn.net[1](ffn.net[0](hidden))))

    vace = WanVACETransformer3DModel(**{**model.config, "vace_layers": [0], "vace_in_channels": 8})
    for module in vace.modules():
        if type(module).__name__ == "FeedForward":
            float8_per_row(module.net[2])
    assert fp8.fuse_gelu_into_float8_ffns(vace) == 3  # two blocks and one VACE block


def fake_torchao(monkeypatch) -> list:
    """``torchao.quantization`` as far as ``fp8.py`` uses it (its float8 needs a GPU): the configs it is given."""
    configs: list = []

    def config(**kwargs):
        if kwargs.get("set_inductor_config", True):  # torchao's recommended_inductor_config_setter
            torch._inductor.config.coordinate_descent_tuning = True
        configs.append(kwargs)
        return kwargs

    module = types.ModuleType("torchao.quantization")
    module.Float8DynamicActivationFloat8WeightConfig = config
    module.PerRow = lambda: "per-row"
    module.quantize_ = lambda model, config, filter_fn=None: None
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", module)
    return configs


def test_float8_set_up_leaves_the_process_inductor_settings_alone(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)  # restored after the test
    configs = fake_torchao(monkeypatch)
    model, _ = small_wan()
    assert fp8.quantize_block_linears(model) == 20  # 2 blocks x (4 self-, 4 cross-attention, 2 FFN)
    assert fp8.probe_linear("cpu") is None
    # torchao's default would turn on coordinate-descent tuning for every later compile (the VAE's too)
    assert inductor_config.coordinate_descent_tuning is False
    assert len(configs) == 2 and all(c["granularity"] == "per-row" for c in configs)


def mark_float8(transformer: torch.nn.Module, limit: int | None = None, then: Exception | None = None) -> int:
    """Stands in for torchao's float8 conversion (GPU only): the block linears' weights gain
    ``qdata`` as a ``Float8Tensor`` has; after ``limit`` of them it raises ``then``."""
    done = 0
    for fqn, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and fqn.split(".", 1)[0] in fp8.BLOCK_PREFIXES:
            if limit is not None and done == limit:
                raise then
            module.weight.qdata = module.weight.data
            done += 1
    return done


def test_fp8_blocks_compile_with_the_tuning_settings_and_bf16_without(tiny_models, monkeypatch):
    monkeypatch.setattr(fp8, "unavailable_reason", lambda: None)
    monkeypatch.setattr(fp8, "fa3_flash_attn_func", lambda: reference_flash_attn_func([]))
    monkeypatch.setattr(fp8, "quantize_block_linears", mark_float8)
    seen: list = []

    def compile_blocks(transformer, errors=None, mode=None, options=None):
        seen.append(options)
        return 0

    def broken(transformer, flash_attn_func):
        raise RuntimeError("FA3 built for another torch")

    cases = [("fp8", fp8.enable_fp8_attention, small_wan()[0]), ("fp8", broken, small_wan()[0])]
    cases.append(("bf16", broken, small_wan()[0]))
    monkeypatch.setattr(accel, "compile_blocks", compile_blocks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # compile is CUDA only
    precisions = []
    for precision, attention, model in cases:
        monkeypatch.setattr(fp8, "enable_fp8_attention", attention)
        settings = tiny_settings(tiny_models, precision=precision, attention_backend="native")
        precisions.append(accel.optimize_transformer(model, settings, accel.AccelReport()).precision)
    assert precisions == ["fp8", "mixed", "bf16"]
    assert seen == [fp8.INDUCTOR_OPTIONS, fp8.INDUCTOR_OPTIONS, None]  # float8 linears compile tuned


def test_fp8_falls_back_to_bf16_visibly(tiny_models, caplog):
    worker = tiny_worker(tiny_models, precision="fp8")
    # a report that an earlier bf16 model decided must not hide the fallback
    worker.manager.accel.precision = accel.PrecisionReport("bf16", "bf16")
    assert accel.precision_status(worker.manager.accel, worker.settings) == {"requested": "fp8", "applied": None}
    with caplog.at_level(logging.WARNING, logger="wan_worker.runtime.accel"):
        worker.manager.pipeline("t2v")
        worker.manager.pipeline("vace")  # a second transformer: no second warning
    warnings = [r for r in caplog.records if "PRECISION=fp8" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].reason == "no CUDA device"
    status = worker.handle({"id": "h", "input": {"action": "health"}}, send=lambda p: None)["precision"]
    assert status == {"requested": "fp8", "applied": "bf16", "reason": "no CUDA device"}
    assert {t["precision"] for t in worker.manager.accel.as_dict()["transformers"]} == {"bf16"}
    for module in fp8.self_attention_modules(worker.manager.pipeline("t2v").transformer):
        assert not isinstance(module.processor, fp8.FP8SelfAttnProcessor)


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L40S")
    assert "Hopper" in fp8.unavailable_reason() and "L40S" in fp8.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(fp8, "fa3_flash_attn_func", lambda: None)
    assert "fa3-fwd" in fp8.unavailable_reason()


def test_attention_probe_accepts_the_contract_and_names_a_failure():
    calls: list = []
    assert fp8.probe_attention(reference_flash_attn_func(calls), "cpu") is None
    assert calls and calls[0]["descale"] == (torch.float32, (1, 2))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    assert "no kernel image" in fp8.probe_attention(broken, "cpu")

    def wrong_scale(q, k, v, softmax_scale=None, **descales):  # ignores the descales
        return reference_flash_attn_func([])(q, k, v, softmax_scale, *(torch.ones_like(descales["q_descale"]),) * 3)

    assert "disagrees" in fp8.probe_attention(wrong_scale, "cpu")


def test_gelu_quant_probe_accepts_the_contract_and_names_a_failure(monkeypatch):
    assert fp8.probe_gelu_quant("cpu") is None

    def doubled(x):  # a kernel whose descales are off by 2
        q, descale = fp8.gelu_quant_rows_reference(x)
        return q, descale * 2

    monkeypatch.setattr(fp8, "gelu_quant_rows", doubled)
    assert "disagrees" in fp8.probe_gelu_quant("cpu")

    def broken(x):
        raise RuntimeError("PassManager::run failed")  # a Triton that can't build the kernel

    monkeypatch.setattr(fp8, "gelu_quant_rows", broken)
    assert "PassManager::run failed" in fp8.probe_gelu_quant("cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_compile_artifacts_are_skipped_without_cuda(tmp_path, tiny_models, precision):
    settings = tiny_settings(tiny_models, precision=precision, compile_cache_dir=tmp_path)
    assert accel.compile_artifacts_path(settings) is None
    assert accel.load_compile_artifacts(settings) == {"loaded": False}
    assert list(tmp_path.iterdir()) == []


def test_step_cache_works_with_the_fp8_processor():
    model, inputs = small_wan()
    calls: list = []
    fp8.enable_fp8_attention(model, reference_flash_attn_func(calls))
    with torch.inference_mode(), accel.step_cache(model, 0.08), model.cache_context("cond"):
        first = model(**inputs)[0]
        full = len(calls)
        second = model(**inputs)[0]  # same input: the first block's output is unchanged
    assert full == 2
    assert len(calls) == full + 1  # only the first block ran; the rest came from the cache
    torch.testing.assert_close(second, first)


@pytest.mark.parametrize("where", ["attention", "halfway through the linears"])
def test_an_fp8_set_up_failing_after_float8_linears_is_reported_as_mixed(tiny_models, monkeypatch, where):
    monkeypatch.setattr(fp8, "unavailable_reason", lambda: None)
    monkeypatch.setattr(fp8, "fa3_flash_attn_func", lambda: reference_flash_attn_func([]))
    error = RuntimeError("FA3 built for another torch" if where == "attention" else "CUDA out of memory")
    if where == "attention":
        monkeypatch.setattr(fp8, "quantize_block_linears", mark_float8)

        def broken(transformer, flash_attn_func):
            raise error

        monkeypatch.setattr(fp8, "enable_fp8_attention", broken)
    else:
        monkeypatch.setattr(fp8, "quantize_block_linears", lambda t: mark_float8(t, limit=3, then=error))
    worker = tiny_worker(tiny_models, precision="fp8")
    transformer = worker.manager.pipeline("t2v").transformer
    status = accel.precision_status(worker.manager.accel, worker.settings)
    # float8 linears can't be undone: the transformer is not bf16, and health says so
    assert status["applied"] == "mixed" and str(error) in status["reason"]
    expected = 3 if where != "attention" else fp8.float8_linear_count(transformer)
    assert expected >= 3 and status["modules"]["transformer"]["float8_linears"] == expected
    assert [t["precision"] for t in worker.manager.accel.as_dict()["transformers"]] == ["mixed"]
    assert all(not isinstance(m.processor, fp8.FP8SelfAttnProcessor) for m in fp8.self_attention_modules(transformer))


def test_a_failing_fp8_set_up_leaves_the_transformer_bf16_and_says_so(tiny_models, monkeypatch):
    monkeypatch.setattr(fp8, "unavailable_reason", lambda: None)  # as on a Hopper GPU with both wheels
    monkeypatch.setattr(fp8, "fa3_flash_attn_func", lambda: reference_flash_attn_func([]))

    def broken(transformer):
        raise RuntimeError("torchao built for another torch")

    monkeypatch.setattr(fp8, "quantize_block_linears", broken)
    worker = tiny_worker(tiny_models, precision="fp8")
    transformer = worker.manager.pipeline("t2v").transformer
    status = accel.precision_status(worker.manager.accel, worker.settings)
    assert status["applied"] == "bf16" and "torchao built for another torch" in status["reason"]
    assert all(not isinstance(m.processor, fp8.FP8SelfAttnProcessor) for m in fp8.self_attention_modules(transformer))
