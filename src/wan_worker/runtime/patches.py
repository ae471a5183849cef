"""Every change this worker makes to another library's code or objects, in one place.

Each patch is applied once (idempotent), only on the library version it was verified against
(``VERIFIED``; on any other version it is skipped and the reason logged once), and guarded by
``tests/test_patches.py``, which fails when the upstream code a patch relies on changes.

* ``enable_fa3`` - diffusers' ``_flash_3`` attention backend only looks for the
  ``flash_attn_interface`` module; the forward-only ``fa3-fwd`` wheel installs its kernel under
  another name, so the dispatcher's private ``flash_attn_3_func`` / ``_CAN_USE_FLASH_ATTN_3``
  globals are pointed at it.
* ``defer_stop_check_on_cuda`` - transformers gates ``DeferredStopCheck`` (read the stop flag
  one decode step late, so the host never waits for the GPU between tokens) to MPS; its
  ``is_supported`` is replaced, process-wide, to allow CUDA too.
* ``compile_forward`` - a block's ``forward`` runs a compiled callable, through a diffusers
  ``ModelHook`` (``COMPILED_FORWARD``): named, and removable with ``remove_hook``.
* ``fuse_norm_silu`` - a VAE ``WanRMS_norm`` computes ``silu(norm(x))`` in one kernel and the
  SiLU that follows it passes its input through; two diffusers hooks (``FUSED_NORM_SILU``,
  ``SILU_FUSED_AWAY``), removable the same way.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

#: The library versions every patch here was verified against.
VERIFIED = {"diffusers": "0.42.1", "transformers": "5.17.0"}

#: diffusers hook names (``HookRegistry``), so each change is visible and removable by name.
COMPILED_FORWARD = "wan_compiled_forward"
FUSED_NORM_SILU = "wan_fused_norm_silu"
SILU_FUSED_AWAY = "wan_silu_fused_into_norm"

_skipped: set[str] = set()


def version_mismatch(package: str) -> str | None:
    """Why a patch of ``package`` must not be applied here (``None``: the verified version)."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"{package} is not installed"
    if installed != VERIFIED[package]:
        return f"{package} {installed} is installed; this patch was verified on {VERIFIED[package]}"
    return None


def _allowed(patch: str, package: str) -> bool:
    """True where ``patch`` may be applied; otherwise logs why, once per patch and process."""
    reason = version_mismatch(package)
    if reason is None:
        return True
    if patch not in _skipped:
        _skipped.add(patch)
        log.warning("library patch skipped", extra={"patch": patch, "reason": reason})
    return False


# -- diffusers: FlashAttention-3 from the fa3-fwd wheel ------------------------------------------------


def enable_fa3() -> bool:
    """Make diffusers' ``_flash_3`` backend use an installed FA3 build; False when there is none
    (or this diffusers is not the verified one and has no FA3 of its own)."""
    import diffusers.models.attention_dispatch as dispatch

    if getattr(dispatch, "_CAN_USE_FLASH_ATTN_3", False) and getattr(dispatch, "flash_attn_3_func", None):
        return True
    if not _allowed("enable_fa3", "diffusers"):
        return False
    from wan_worker.runtime.fp8 import fa3_flash_attn_func

    func = fa3_flash_attn_func()
    if func is None:
        return False
    dispatch.flash_attn_3_func = func
    dispatch._CAN_USE_FLASH_ATTN_3 = True
    return True


# -- transformers: deferred stop check on CUDA ----------------------------------------------------


def defer_stop_check_on_cuda() -> bool:
    """Let ``generate`` read its stop flag one step late on CUDA, as it already does on MPS.

    transformers' ``DeferredStopCheck`` copies "all sequences finished?" to pinned memory and
    reads it on the next step, so the host queues step N+1 while the GPU still runs step N
    instead of waiting for the GPU every token; it costs one extra decode step per call, which
    ``generate`` undoes. transformers gates it to MPS "until gains are observed on CUDA";
    the benchmark's ``qwen`` section (``benchmarks/qwen.py``) measures them. Process-wide and idempotent; False when this
    transformers is not the verified one or has no such class.
    """
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:
        return False
    deferred = getattr(gen_utils, "DeferredStopCheck", None)
    if deferred is None:
        return False
    if getattr(deferred, "_wan_cuda", False):
        return True
    if not _allowed("defer_stop_check_on_cuda", "transformers"):
        return False
    original = deferred.is_supported

    def is_supported(device: torch.device, cache: Any, cache_is_returned: bool, is_assistant: bool) -> bool:
        if device.type == "cuda" and not is_assistant:
            return cache is None or not cache_is_returned or cache.is_croppable
        return original(device, cache, cache_is_returned, is_assistant)

    deferred.is_supported = staticmethod(is_supported)
    deferred._wan_cuda = True
    return True


# -- diffusers hooks: compiled block forwards, fused VAE norms ---------------------------------------


@functools.cache
def _hook_classes() -> tuple[type, type, type]:
    """The hook classes, built on first use so importing this module does not import diffusers."""
    from diffusers.hooks import ModelHook

    class CompiledForward(ModelHook):
        """Runs ``call`` instead of the module's forward. Hooks registered later (diffusers'
        step cache) wrap this one and so stay eager around it."""

        def __init__(self, call: Callable) -> None:
            super().__init__()
            self.call = call

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.call(*args, **kwargs)

    class FusedNormSilu(ModelHook):
        """The norm returns ``fused(norm, x)``: the norm and the SiLU after it in one pass."""

        def __init__(self, fused: Callable) -> None:
            super().__init__()
            self.fused = fused

        def new_forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return self.fused(module, x)

    class Passthrough(ModelHook):
        """The SiLU whose work the fused norm already did returns its input."""

        def new_forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return x

    return CompiledForward, FusedNormSilu, Passthrough


def _registry(module: torch.nn.Module):
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


def has_hook(module: torch.nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def compile_forward(module: torch.nn.Module, make: Callable[[Callable], Callable]) -> bool:
    """Run ``make(module's forward)`` as the module's forward (``COMPILED_FORWARD`` hook); False
    when it already does, or this diffusers is not the verified one."""
    if has_hook(module, COMPILED_FORWARD) or not _allowed("compile_forward", "diffusers"):
        return False
    compiled, _, _ = _hook_classes()
    _registry(module).register_hook(compiled(make(module.forward)), COMPILED_FORWARD)
    return True


def fuse_norm_silu(norm: torch.nn.Module, silu: torch.nn.Module, fused: Callable) -> bool:
    """``norm`` computes ``fused(norm, x)`` (norm + SiLU) and ``silu`` passes its input through.
    False when already fused, or this diffusers is not the verified one."""
    if has_hook(norm, FUSED_NORM_SILU) or not _allowed("fuse_norm_silu", "diffusers"):
        return False
    _, fused_norm, passthrough = _hook_classes()
    _registry(norm).register_hook(fused_norm(fused), FUSED_NORM_SILU)
    if not has_hook(silu, SILU_FUSED_AWAY):
        _registry(silu).register_hook(passthrough(), SILU_FUSED_AWAY)
    return True
