"""Guards for every change ``patches.py`` makes to diffusers and transformers.

Each patch was verified on the versions in ``patches.VERIFIED``. These tests pin the upstream
code each one relies on (the private globals and their readers, the replaced method, the
modules whose forward the hooks take over) by a hash of its source, so an upgrade that
changes any of it fails here, where the reason is named, instead of misbehaving on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging

import torch

from wan_worker.runtime import patches


def source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def test_the_installed_libraries_are_the_verified_ones():
    for package, version in patches.VERIFIED.items():
        assert importlib.metadata.version(package) == version, f"re-verify patches.py for {package}"
        assert patches.version_mismatch(package) is None


def test_fa3_patch_targets_module_globals_that_diffusers_reads_at_call_time():
    """``enable_fa3`` rebinds two private globals of diffusers' attention dispatcher; that only
    works while the functions that use them read the module globals at call time."""
    import diffusers.models.attention_dispatch as dispatch

    assert isinstance(dispatch._CAN_USE_FLASH_ATTN_3, bool)
    assert hasattr(dispatch, "flash_attn_3_func")
    check = dispatch._check_attention_backend_requirements
    wrapped = dispatch._wrapped_flash_attn_3._init_fn
    assert "_CAN_USE_FLASH_ATTN_3" in check.__code__.co_names
    assert "flash_attn_3_func" in wrapped.__code__.co_names
    assert source_hash(check) == "f7916603cb3ae471"
    assert source_hash(wrapped) == "432b14b27e9c6978"


def test_deferred_stop_check_patch_replaces_the_verified_method():
    from transformers.generation import utils as gen_utils

    cls = gen_utils.DeferredStopCheck
    original = inspect.getattr_static(cls, "is_supported")
    assert isinstance(original, staticmethod)
    params = list(inspect.signature(cls.is_supported).parameters)
    assert params == ["device", "cache", "cache_is_returned", "is_assistant"]
    # the source file's version (unaffected by the patch being applied in this process)
    source = inspect.getsource(cls)
    start = source.index("    @staticmethod\n    def is_supported(")
    end = source.index("\n    def ", start + len("    @staticmethod\n    def is_supported("))
    digest = hashlib.sha256(source[start:end].encode()).hexdigest()[:16]
    assert digest == "889bc8cdaa232b22", digest


def test_fused_vae_norm_matches_the_norm_it_replaces():
    """The fused kernel repeats ``WanRMS_norm``'s math, and relies on each SiLU it passes through
    coming right after a norm in the residual blocks and the decoder head."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    assert source_hash(wan.WanRMS_norm.forward) == "fc44101b65138738"
    assert source_hash(wan.WanResidualBlock.forward) == "82e9104df2acf11a"
    assert source_hash(wan.WanDecoder3d.forward) == "927efe06256e3b6d"


def test_hooks_are_named_idempotent_and_removable():
    from diffusers.hooks import HookRegistry

    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    expected = linear(x)
    calls: list[int] = []

    def make(forward):
        def call(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        return call

    assert patches.compile_forward(linear, make)
    assert not patches.compile_forward(linear, make)  # once
    torch.testing.assert_close(linear(x), expected)
    assert calls == [1] and patches.has_hook(linear, patches.COMPILED_FORWARD)
    HookRegistry.check_if_exists_or_initialize(linear).remove_hook(patches.COMPILED_FORWARD)
    torch.testing.assert_close(linear(x), expected)
    assert calls == [1] and not patches.has_hook(linear, patches.COMPILED_FORWARD)

    norm, silu = torch.nn.LayerNorm(4), torch.nn.SiLU()
    assert patches.fuse_norm_silu(norm, silu, lambda module, t: torch.nn.functional.silu(module.forward.__wrapped__(t)))
    assert not patches.fuse_norm_silu(norm, silu, lambda module, t: t)
    torch.testing.assert_close(
        silu(norm(x)), torch.nn.functional.silu(torch.nn.functional.layer_norm(x, (4,), norm.weight, norm.bias))
    )
    torch.testing.assert_close(silu(x), x)  # passes through
    HookRegistry.check_if_exists_or_initialize(silu).remove_hook(patches.SILU_FUSED_AWAY)
    torch.testing.assert_close(silu(x), torch.nn.functional.silu(x))


def test_a_patch_is_skipped_with_a_logged_reason_on_another_version(monkeypatch, caplog):
    monkeypatch.setitem(patches.VERIFIED, "diffusers", "0.0.1")
    monkeypatch.setattr(patches, "_skipped", set())
    linear = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="wan_worker.runtime.patches"):
        assert not patches.compile_forward(linear, lambda forward: forward)
        assert not patches.compile_forward(linear, lambda forward: forward)
    skipped = [r for r in caplog.records if r.getMessage() == "library patch skipped"]
    assert len(skipped) == 1 and "verified on 0.0.1" in skipped[0].reason
    assert not patches.has_hook(linear, patches.COMPILED_FORWARD)


def test_deferred_stop_check_is_not_patched_on_another_transformers(monkeypatch):
    from transformers.generation import utils as gen_utils

    cls = gen_utils.DeferredStopCheck
    monkeypatch.setattr(cls, "_wan_cuda", False, raising=False)  # as before any patch in this process
    before = inspect.getattr_static(cls, "is_supported")
    monkeypatch.setitem(patches.VERIFIED, "transformers", "0.0.1")
    assert not patches.defer_stop_check_on_cuda()
    assert inspect.getattr_static(cls, "is_supported") is before


def test_compiled_block_hooks_trace_whole_and_sit_inside_the_step_cache(tiny_models, monkeypatch):
    """``accel.compile_blocks`` through the hook: dynamo traces each block's forward in one graph
    (``fullgraph=True``, a graph-counting backend here), the output is unchanged, and diffusers'
    first-block cache, enabled afterwards, wraps the compiled blocks and still skips the rest."""
    import functools

    from diffusers import WanTransformer3DModel

    from wan_worker.runtime.accel import compile_blocks, step_cache, transformer_dummy_inputs
    from wan_worker.runtime.tiny import T2V_DIR

    graphs: list = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    transformer = WanTransformer3DModel.from_pretrained(tiny_models / T2V_DIR, subfolder="transformer").eval()
    inputs = transformer_dummy_inputs(transformer, 32, 32, 5, "cpu", text_len=8)
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        expected = transformer(**inputs)[0]
        errors: dict[str, str] = {}
        assert compile_blocks(transformer, errors) == len(transformer.blocks)
        assert compile_blocks(transformer, errors) == 0  # idempotent
        torch.testing.assert_close(transformer(**inputs)[0], expected)
        assert errors == {} and graphs
        with step_cache(transformer, 0.5), transformer.cache_context("cond"):
            first = transformer(**inputs)[0]
            second = transformer(**inputs)[0]  # served from the cache after the first block
        torch.testing.assert_close(first, expected)
        torch.testing.assert_close(second, first)
    assert all(patches.has_hook(block, patches.COMPILED_FORWARD) for block in transformer.blocks)


def test_json_logs_format_utc_without_changing_other_formatters():
    """Not a patch: the UTC converter belongs to ``JsonFormatter``, not to ``logging.Formatter``."""
    import time

    from wan_worker.infra import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure("INFO", [])
        assert logging.Formatter.converter is time.localtime
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
        record.created = 0.0
        assert root.handlers[0].formatter.formatTime(record, "%Y-%m-%d %H") == "1970-01-01 00"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
