"""Helpers every section shares: the benchmark's prompt and seed, clocks, PSNR, FLOP counts,
synthetic inputs, and the record of the software stack a run used."""

from __future__ import annotations

import base64
import gc
import io
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

GiB = 1024**3
T2V_REPO, VACE_REPO, QWEN_REPO, TURBO_REPO = (
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
    "Qwen/Qwen2.5-7B",
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers",
)
FULL_MODELS = ("t2v", "vace", "qwen", "turbo")

PROMPT = (
    "A red fox trots through fresh snow in a quiet birch forest at dawn, breath steaming, "
    "soft golden light filtering between the trunks, the camera tracking slowly beside it."
)
NEGATIVE = "blurry, low quality, distorted, watermark, text"
SEED = 1234


def now() -> float:
    return time.perf_counter()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two frame stacks in [0, 1] (or uint8); inf when identical."""
    if a is None or b is None or a.shape != b.shape:
        return None
    a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
    b = b.astype(np.float32) / (255.0 if b.dtype == np.uint8 else 1.0)
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def gpu_peak_gib() -> float | None:
    import torch

    return r(torch.cuda.max_memory_allocated() / GiB, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages, so the next load reads the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def transformer_flops(tokens: int, text_len: int = 512, dim: int = 1536, ffn: int = 8960, layers: int = 30) -> float:
    """Analytic FLOPs of one Wan transformer forward (matmuls and attention; 2 per MAC)."""
    self_attn = 8 * tokens * dim * dim + 4 * tokens * tokens * dim
    cross_attn = 4 * tokens * dim * dim + 4 * text_len * dim * dim + 4 * tokens * text_len * dim
    ffn_flops = 4 * tokens * dim * ffn
    return float(layers * (self_attn + cross_attn + ffn_flops))


def config_flops(cfg, tokens: int) -> float:
    """``transformer_flops`` for a loaded transformer's config (tiny or full)."""
    return transformer_flops(
        tokens, dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn=cfg.ffn_dim, layers=cfg.num_layers
    )


def attention_flops(tokens: int, dim: int = 1536, layers: int = 30) -> float:
    return float(layers * 4 * tokens * tokens * dim)


def tokens_for(frames: int, height: int, width: int) -> int:
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def natural_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A camera pan over a smooth textured scene: compresses like real footage, unlike noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : height + 2 * frames, 0 : width + 2 * frames].astype(np.float32)
    base = np.stack(
        [0.5 + 0.3 * np.sin(xx / 60 + yy / 90), 0.5 + 0.3 * np.cos(yy / 70), 0.4 + 0.2 * np.sin((xx + yy) / 110)], -1
    )
    base = np.clip(base + rng.normal(0, 0.03, base.shape[:2] + (1,)).astype(np.float32), 0, 1)
    return np.stack([base[i : i + height, 2 * i : 2 * i + width] for i in range(frames)])


def png_data_uri(width: int, height: int, color: tuple[int, int, int]) -> str:
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = (color[0] + xx * 97 // max(width, 1)) % 256
    arr[..., 1] = (color[1] + yy * 89 // max(height, 1)) % 256
    arr[..., 2] = color[2]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "triton", "imageio_ffmpeg", "boto3"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=torch.cuda.get_device_name(0),
            device_memory_gib=r(props.total_memory / GiB, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        out["device"] = "cpu"
    out["cpu_count"] = os.cpu_count()
    try:
        import imageio_ffmpeg

        out["ffmpeg"] = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001
        out["ffmpeg"] = f"missing: {exc}"
    from wan_worker.runtime import stack

    shipped = stack.shipped_stack()
    comparison = stack.compare(shipped, stack.installed_versions())
    out["stack"] = {"shipped": shipped, "found": stack.installed_versions(), **comparison}
    out["as_shipped"] = comparison["as_shipped"]
    return out
