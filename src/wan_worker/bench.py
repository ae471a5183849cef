"""Benchmark harness: ``python -m wan_worker.bench`` (GPU) or ``--tiny`` (CPU smoke test).

It runs the worker's real job path, stage by stage, on random weights of the real
architectures (random weights cost exactly what trained weights cost per step):

* **write_models** - Wan2.1-T2V-1.3B (full transformer, UMT5-XXL-shaped encoder, default
  VAE), the Wan2.1-VACE-1.3B transformer, the FastWan2.1-T2V-1.3B (turbo) transformer with its
  sparse-attention gate weights, and a Qwen2.5-7B-shaped model, saved with
  ``save_pretrained`` as safetensors under ``MODELS_DIR/<repo name>`` (what ``ModelLocator``
  resolves). ``--tiny`` uses the tiny profile's checkpoints instead.
* **cold_start** (``coldstart``) - a fresh process: imports, ``Worker``, model load from disk
  (page cache dropped first where the OS allows), compile warm-up with the portable compile
  artifacts, until ready; on a GPU also a restart with both compile caches and a restart with
  the artifacts file alone.
* **attention / transformer** - each attention backend, and transformer forwards eager vs
  compiled, with effective TFLOP/s against the analytic FLOP count.
* **vae** - decode in fp32 / bf16 / channels-last / fused norms, time and PSNR vs fp32, and a
  kernel profile of the worker's configuration.
* **reference** - plain diffusers ``WanPipeline``, eager, same weights, prompt and seed.
* **worker** - ``Worker.handle`` end to end (job start to uploaded assets), uncached and with
  the step cache; per-step times, stage times, PSNR of the decoded frames vs the reference
  (uncached) and vs the uncached worker run (cached).
* **cpu_stages** - MP4 + thumbnail + upload on the decoded frames and on a natural-looking
  clip, per x264 preset, with the encoded video's PSNR.
* **qwen** - load time from local disk, decode tokens/s as configured, without the deferred stop
  check, and eager with a dynamic cache; the real enhancer call.
* **residency** - a fresh process capped at 48 GB of the card runs all eight job types and
  every reference mode under ``GPU_MEMORY_BUDGET_GB=44``; peak allocated memory per job.
* **scaling** - transformer forward and attention time at 17/33/49/81 frames and 720p.
* **turbo** - ``quality: "turbo"`` on the warm worker: a video and an image end to end, median
  of ``--turbo-runs``, stage times from the job's ``metadata.timings``, and the speed-up over the
  same run's uncached ``video_fast``.
* **turbo_residency** - a fresh process capped like ``residency`` with T2V, VACE, turbo, UMT5
  (and Qwen when written) all loaded; turbo, ``video_fast`` and VACE jobs, peak memory per job.
* **lora** - a warm compiled worker of its own, started with ``LORA_DIR`` holding two rank-32
  LoRAs on every linear of the real layer shapes: first use, a switch between cached LoRAs,
  per-step overhead with vs without a LoRA, and graphs compiled after warm-up.
* **long** - 15 s and 60 s videos (``duration_seconds``, VACE-continued segments) at ``fast``
  (``--long-steps``) and ``turbo``: total, per-segment time, peak VRAM, host RSS growth, and
  whether per-segment time, VRAM and RSS stay flat from 15 s to 60 s.
* **fp8** - the same-seed ``video_fast`` job in bf16 and ``PRECISION=fp8``, each in a fresh
  process: end to end, per forward, warm-up compile time, PSNR of fp8 vs bf16 frames.

A plain ``--tiny`` (CI) leaves out fp8, turbo, turbo_residency, lora and long; ``--sections``
runs them on the tiny profile too.

``versions`` records the stack the run used (python, torch, CUDA, triton, diffusers,
transformers, fa3-fwd, torchao, the GPU) and ``as_shipped``: whether it is exactly the image's
pinned stack (``requirements-gpu.txt``); the harness prints which at its start and end.

Output is one JSON document (``--out``), rewritten after every section, so an interrupted
run still leaves what it measured. Nothing is asserted on timings here; the numbers are
read by people (docs/PERFORMANCE.md) and compared between runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .local_s3 import S3Server, find_weed, start_s3

GiB = 1024**3
T2V_REPO, VACE_REPO, QWEN_REPO, TURBO_REPO = (
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
    "Qwen/Qwen2.5-7B",
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers",
)
FULL_MODELS = ("t2v", "vace", "qwen", "turbo")

#: The real architectures (Wan2.1-T2V-1.3B, UMT5-XXL encoder, Wan2.1-VACE-1.3B, Qwen2.5-7B).
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
VACE_EXTRA = dict(vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
)
QWEN_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
)

PROMPT = (
    "A red fox trots through fresh snow in a quiet birch forest at dawn, breath steaming, "
    "soft golden light filtering between the trunks, the camera tracking slowly beside it."
)
NEGATIVE = "blurry, low quality, distorted, watermark, text"
SEED = 1234

# --------------------------------------------------------------------------------------------
# small helpers


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
    from . import stack

    shipped = stack.shipped_stack()
    comparison = stack.compare(shipped, stack.installed_versions())
    out["stack"] = {"shipped": shipped, "found": stack.installed_versions(), **comparison}
    out["as_shipped"] = comparison["as_shipped"]
    return out


# --------------------------------------------------------------------------------------------
# model writing


def _umt5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _qwen_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer whose vocabulary covers every id the model can emit."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    n_regular = vocab_size - len(specials)
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= n_regular:
                break
            vocab.setdefault(a + b, len(vocab))
    i = 0
    while len(vocab) < n_regular:  # three-symbol pieces for the rest
        a, b, c = alphabet[i % 256], alphabet[(i // 256) % 256], alphabet[(i // 65536) % 256]
        vocab.setdefault(a + b + c, len(vocab))
        i += 1
    # Pair merges over printable ASCII (and the space marker): about two characters a token,
    # so the enhancer's prompt has a realistic length (the real tokenizer: about four).
    printable = [bytes_to_unicode()[b] for b in range(32, 127)]
    merges = [(a, b) for a in printable for b in printable]
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )


@contextlib.contextmanager
def _build_on(device: str, dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def write_full_models(models_dir: Path, which: tuple[str, ...] = FULL_MODELS) -> dict[str, Any]:
    """Random weights of the real architectures, saved as the real checkpoints are laid out."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {}
    models_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "t2v": models_dir / Path(T2V_REPO).name,
        "vace": models_dir / Path(VACE_REPO).name,
        "qwen": models_dir / Path(QWEN_REPO).name,
        "turbo": models_dir / Path(TURBO_REPO).name,
    }
    for name in which:
        target = targets[name]
        if (target / ".complete").exists():
            report[name] = {"path": str(target), "reused": True, "gib_on_disk": r(_dir_bytes(target) / GiB, 2)}
            continue
        shutil.rmtree(target, ignore_errors=True)
        started = now()
        torch.manual_seed(0)
        if name == "t2v":
            from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
            from transformers import UMT5Config, UMT5EncoderModel

            with _build_on(device, torch.bfloat16):
                transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
                encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
            with _build_on(device, torch.float32):
                vae = AutoencoderKLWan()
            pipe = WanPipeline(
                tokenizer=_umt5_tokenizer(),
                text_encoder=encoder,
                vae=vae,
                scheduler=_scheduler(),
                transformer=transformer,
            )
            pipe.save_pretrained(target)
            del pipe, transformer, encoder, vae
        elif name == "vace":
            from diffusers import WanVACETransformer3DModel

            with _build_on(device, torch.bfloat16):
                transformer = WanVACETransformer3DModel(**WAN_TRANSFORMER, **VACE_EXTRA)
            transformer.save_pretrained(target / "transformer")
            (target / "model_index.json").write_text(
                json.dumps({"_class_name": "WanVACEPipeline", "note": "bench: transformer only"})
            )
            del transformer
        elif name == "turbo":
            _write_turbo(target, device)
        else:
            from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

            tok = _qwen_tokenizer(QWEN_7B["vocab_size"])
            eos = tok.convert_tokens_to_ids("<|endoftext|>")
            with _build_on(device, torch.bfloat16):
                model = Qwen2ForCausalLM(
                    Qwen2Config(**QWEN_7B, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
                ).eval()
            model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
            model.save_pretrained(target)
            tok.save_pretrained(target)
            del model
        free_cuda()
        (target / ".complete").touch()
        report[name] = {
            "path": str(target),
            "seconds": r(now() - started, 1),
            "gib_on_disk": r(_dir_bytes(target) / GiB, 2),
        }
    return report


def _write_turbo(target: Path, device: str) -> None:
    """The distilled checkpoint as the worker reads it: the dense Wan 1.3B transformer plus the
    sparse-attention gate (``attn1.to_gate_compress``) the real file carries and the worker skips.
    No ``text_encoder``/``vae`` configs: the worker then takes them as the base model's."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    with _build_on(device, torch.bfloat16):
        transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
    transformer.save_pretrained(target / "transformer", max_shard_size="100GB")
    del transformer
    weights_file = target / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    inner = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]
    for block in range(WAN_TRANSFORMER["num_layers"]):
        weights[f"blocks.{block}.attn1.to_gate_compress.weight"] = (
            torch.randn(inner, inner, dtype=torch.bfloat16) * 0.02
        )
        weights[f"blocks.{block}.attn1.to_gate_compress.bias"] = torch.zeros(inner, dtype=torch.bfloat16)
    save_file(weights, weights_file, metadata={"format": "pt"})
    (target / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "note": "bench: transformer only (shares UMT5 and VAE)"})
    )


def write_lora(path: Path, *, dim: int, ffn: int, layers: int, rank: int, seed: int) -> int:
    """A PEFT/diffusers-format LoRA on every linear of every block (attention q/k/v/out of
    self- and cross-attention, both FFN projections) at the given shapes; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    shapes = {f"{a}.{p}": (dim, dim) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= {"ffn.net.0.proj": (dim, ffn), "ffn.net.2": (ffn, dim)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, (n_in, n_out) in shapes.items():
            base = f"transformer.blocks.{i}.{module}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).to(torch.bfloat16)
            tensors[f"{base}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.01).to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.stat().st_size


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# instrumentation of the real job path


class StepClock:
    """Synchronised timestamps of the job's text encoding, every denoising step and the decoded
    frames: a ``wan_worker.observer.JobObserver`` passed to ``Worker.handle``."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.started: float | None = None
        self.generating_at: float | None = None
        self.text_encoded_at: float | None = None
        self.decoded_at: float | None = None
        self.frames = None

    def stage_started(self, name: str) -> None:
        if name == "generating":
            sync()
            self.marks, self.generating_at = [], now()

    def text_encoded(self) -> None:
        sync()
        self.text_encoded_at = now()

    def step_finished(self, step: int, total: int) -> None:
        sync()
        self.marks.append(now())

    def frames_decoded(self, frames) -> None:
        sync()
        self.decoded_at, self.frames = now(), frames


def run_job(worker, job: dict, clock: StepClock | None = None, keep_metadata: bool = False) -> dict[str, Any]:
    """``Worker.handle`` on one job, with stage and per-step timings and the decoded frames
    (and the job's whole ``metadata`` with ``keep_metadata``)."""
    clock = clock or StepClock()
    sent: list = []
    reset_peak()
    sync()
    started = now()
    output = worker.handle({"id": job.get("id", "bench"), "input": job}, send=sent.append, observer=clock)
    total = now() - started
    meta = output.get("metadata") or {}
    encoded_at = clock.text_encoded_at
    steps = np.diff([encoded_at or started, *clock.marks]).tolist() if clock.marks else []
    text_encoding = encoded_at - clock.generating_at if encoded_at and clock.generating_at else None
    result: dict[str, Any] = {
        "status": output.get("status", "failed"),
        "error": output.get("error"),
        "total_s": r(total),
        "text_encoding_s": r(text_encoding),
        "steps": len(steps),
        "step_s": [r(s, 4) for s in steps],
        "step_median_s": r(float(np.median(steps)), 4) if steps else None,
        "denoising_s": r(sum(steps)) if steps else None,
        "vae_decode_and_postprocess_s": r(clock.decoded_at - clock.marks[-1])
        if clock.marks and clock.decoded_at is not None
        else None,
        "worker_timings": meta.get("timings"),
        "peak_vram_gib": gpu_peak_gib(),
        "file_size_bytes": ((output.get("assets") or [{}])[0].get("metadata") or {}).get("file_size_bytes"),
        "step_cache": meta.get("step_cache"),
    }
    if result["status"] != "completed":
        result["output"] = {k: v for k, v in output.items() if k not in ("assets",)}
    if keep_metadata:
        result["metadata"] = meta
    result["_frames"] = clock.frames
    return result


def bench_job(width: int, height: int, frames: int, steps: int, **extra) -> dict[str, Any]:
    """The benchmark's ``video_fast`` job: fixed prompt and seed, step cache off."""
    job = {
        "job_type": "video_fast",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "seed": SEED,
        "width": width,
        "height": height,
        "frame_num": frames,
        "step_cache": "off",
        "config": {"num_inference_steps": steps, "sample_shift": 5.0},
        "user_id": "bench",
    }
    job.update(extra)
    return job


class RssSampler:
    """The process' resident set size before a block and its peak during it (sampled every
    50 ms; the kernel's own high-water mark can't be reset per job)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc, self.interval = psutil.Process(), interval
        self.before = self.peak = 0
        self._stop = None

    def __enter__(self) -> RssSampler:
        import threading

        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _steady_per_frame_s(run: dict[str, Any]) -> float | None:
    """Seconds per frame of the segments that compiled nothing: not segment 1 (its own model),
    not the first VACE segment and not a last segment of another length (each compiles its shape
    once per worker)."""
    times, frames = run.get("segment_s") or [], run.get("segment_frames") or []
    steady = [t / f for i, (t, f) in enumerate(zip(times, frames, strict=True)) if 1 < i < len(times) - 1]
    return float(np.median(steady)) if steady else None


def _long_checks(short: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """Does a longer video cost the same per frame, the same VRAM and no more host memory?"""
    out: dict[str, Any] = {}
    a, b = _steady_per_frame_s(short), _steady_per_frame_s(long)
    if a and b:
        out.update(
            per_frame_s=[r(a, 4), r(b, 4)], segment_time_ratio=r(b / a, 3), segment_time_linear=abs(b / a - 1) <= 0.10
        )
    if short.get("peak_vram_gib") is not None and long.get("peak_vram_gib") is not None:
        grows = long["peak_vram_gib"] - short["peak_vram_gib"]
        out.update(vram_growth_gib=r(grows, 2), vram_flat=grows <= 1.0)
    if short.get("rss_growth_gib") is not None and long.get("rss_growth_gib") is not None:
        # the peak host memory of the long job against the short job's (the first job also pays
        # one-time allocations: CUDA context, compile caches)
        grows = long["rss_before_gib"] + long["rss_growth_gib"] - (short["rss_before_gib"] + short["rss_growth_gib"])
        out.update(rss_peak_growth_short_to_long_gib=r(grows, 3), rss_ok=grows < 2.0)
    return out


# --------------------------------------------------------------------------------------------
# the harness


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.out_path = Path(args.out) if args.out else None
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="wan-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(args.models_dir) if args.models_dir else self.work / "models"
        self.tiny_dir = Path(args.tiny_models_dir) if args.tiny_models_dir else self.models_dir / "tiny"
        if self.tiny:
            self.height, self.width, self.frames, self.steps = 256, 256, 9, 2
        else:
            self.height, self.width, self.frames, self.steps = args.height, args.width, args.frames, args.steps
        self.guidance = 6.5  # video_fast's preset
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, "-m", "wan_worker.bench", *sys.argv[1:]]),
            "mode": "tiny" if self.tiny else "full",
            "shape": {
                "frames": self.frames,
                "height": self.height,
                "width": self.width,
                "steps": self.steps,
                "guidance_scale": self.guidance,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sections": {},
        }
        self.frames_ref: np.ndarray | None = None
        self.frames_worker: np.ndarray | None = None
        self.s3: S3Server | None = None

    # -- plumbing --------------------------------------------------------------------------

    def save(self) -> None:
        if self.out_path:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            tmp.replace(self.out_path)

    def section(self, name: str, fn) -> None:
        wanted = self.args.sections
        if wanted and name not in wanted:
            return
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        started = now()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        if isinstance(value, dict):
            value.setdefault("section_seconds", r(now() - started, 1))
        self.result["sections"][name] = value
        print(f"[bench] {name} done in {now() - started:.1f}s", file=sys.stderr, flush=True)
        self.save()
        free_cuda()

    def settings(self, **overrides):
        from .settings import Settings

        base: dict[str, Any] = dict(
            models_dir=self.models_dir, work_dir=self.work, log_level="WARNING", job_timeout_s=3600
        )
        if self.tiny:
            base.update(model_profile="tiny", tiny_models_dir=self.tiny_dir)
        if self.s3 is not None:
            base.update(self.s3.settings())
        else:
            base.update(inline_max_bytes=1 << 30)  # no S3: assets come back inline
        base.update(overrides)
        return Settings(**base)

    def job(self, **extra) -> dict[str, Any]:
        return bench_job(self.width, self.height, self.frames, self.steps, **extra)

    def t2v_dir(self) -> Path:
        if self.tiny:
            from .tiny import T2V_DIR

            return self.tiny_dir / T2V_DIR
        return self.models_dir / Path(T2V_REPO).name

    # -- sections --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import torch

        from .stack import describe

        self.result["versions"] = versions()
        self.save()
        print(f"[bench] {describe(self.result['versions']['stack'])}", file=sys.stderr, flush=True)
        if not self.tiny and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU smoke test")
        order = [
            "write_models",
            "s3_server",
            "cold_start",
            "attention",
            "transformer",
            "vae",
            "reference",
            "worker",
            "cpu_stages",
            "qwen",
            "residency",
            "scaling",
            "turbo",
            "turbo_residency",
            "lora",
            "long",
            "fp8",
        ]
        if self.args.s3 != "weed":
            order.remove("s3_server")
        if self.tiny and not self.args.sections:  # more workers and jobs: in CI only when asked for
            for name in ("fp8", "turbo", "turbo_residency", "lora", "long"):
                order.remove(name)
        if self.args.sections:  # the caller's order, so the most wanted numbers come first
            order = [n for n in self.args.section_order if n in order]
        for name in order:
            method = {"s3_server": "start_s3", "worker": "worker_runs", "fp8": "fp8_runs"}.get(name, name)
            self.section(name, getattr(self, method))
        if self.s3 is not None:
            self.s3.stop()
        self.result["summary"] = self.summary()
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()
        print(f"[bench] {describe(self.result['versions']['stack'])}", file=sys.stderr, flush=True)
        return self.result

    def write_models(self) -> dict[str, Any]:
        if self.tiny:
            from .tiny import ensure_tiny_models

            started = now()
            ensure_tiny_models(self.tiny_dir)
            return {"profile": "tiny", "seconds": r(now() - started, 1)}
        which = tuple(w for w in FULL_MODELS if w in self.args.models)
        return write_full_models(self.models_dir, which)

    def start_s3(self) -> dict[str, Any]:
        weed = os.environ.get("WEED_BIN") or find_weed()
        if not weed:
            return {"available": False, "substitute": "inline base64 (no S3 server binary found)"}
        started = now()
        self.s3 = start_s3(self.work / "seaweedfs", weed=weed)
        return {"available": True, "binary": weed, "startup_s": r(now() - started, 2), "endpoint": self.s3.endpoint}

    def _child_env(self, settings) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in settings.model_dump().items():
            if value is None or key in ("hf_token", "runpod_ai_api_key"):
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[key.upper()] = str(value)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        return env

    def _cold_child(self, env: dict[str, str]) -> dict[str, Any]:
        dropped = drop_page_cache()
        cmd = [
            sys.executable,
            "-m",
            "wan_worker.bench",
            "--child",
            "cold_start",
            "--height",
            str(self.height),
            "--width",
            str(self.width),
            "--frames",
            str(self.frames),
        ]
        started = now()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        wall = now() - started
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"child exited {proc.returncode}", "stderr": proc.stderr[-3000:]}
        out = json.loads(lines[-1])
        out.update(page_cache_dropped=dropped, wall_s_from_parent=r(wall, 2))
        return out

    def cold_start(self) -> dict[str, Any]:
        """A fresh worker process until ready, phase by phase: a first start (empty compile
        caches), a restart with both caches (inductor's directory and the portable compile
        artifacts, as on a network volume), and a restart with the artifacts file alone (a new
        machine whose inductor directory is empty)."""
        env = self._child_env(self.settings(precision=self.args.precision))
        env["WARMUP_ON_START"] = "1"
        cache, artifacts = self.work / "inductor-cache-cold", self.work / "compile-artifacts-cold"
        for folder in (cache, artifacts):
            shutil.rmtree(folder, ignore_errors=True)
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache), COMPILE_CACHE_DIR=str(artifacts))
        first = self._cold_child(env)
        out = dict(first)
        if not self.tiny and "error" not in first:
            out["restart_with_compile_cache"] = self._cold_child(env)
            empty = self.work / "inductor-cache-empty"
            shutil.rmtree(empty, ignore_errors=True)
            out["restart_with_artifacts_only"] = self._cold_child({**env, "TORCHINDUCTOR_CACHE_DIR": str(empty)})
        return out

    def fp8_runs(self) -> dict[str, Any]:
        """The same-seed ``video_fast`` job in bf16 and in ``PRECISION=fp8``, each in a fresh
        process with empty compile caches: end to end, per forward, compile time, and the PSNR
        of the fp8 frames against the bf16 ones (target: at least 35 dB)."""
        runs: dict[str, Any] = {}
        frames: dict[str, np.ndarray] = {}
        for precision in ("bf16", "fp8"):
            env = self._child_env(self.settings(precision=precision))
            cache = self.work / f"inductor-cache-{precision}"
            shutil.rmtree(cache, ignore_errors=True)
            env.update(
                WARMUP_ON_START="0", TORCHINDUCTOR_CACHE_DIR=str(cache), COMPILE_CACHE_DIR=str(cache / "artifacts")
            )
            frames_path = self.work / f"frames-{precision}.npy"
            frames_path.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "wan_worker.bench",
                "--child",
                "precision_run",
                "--frames-out",
                str(frames_path),
                *("--height", str(self.height), "--width", str(self.width)),
                *("--frames", str(self.frames), "--steps", str(self.steps)),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                runs[precision] = {"error": f"child exited {proc.returncode}", "stderr": proc.stderr[-3000:]}
                continue
            runs[precision] = json.loads(lines[-1])
            if frames_path.exists():
                frames[precision] = np.load(frames_path).astype(np.float32)
        out: dict[str, Any] = {"versions": self.result.get("versions", {}).get("stack"), **runs}
        bf16, fp8 = runs.get("bf16", {}), runs.get("fp8", {})
        out["fp8_applied"] = (fp8.get("precision") or {}).get("applied") == "fp8"
        if not out["fp8_applied"]:
            reason = (fp8.get("precision") or {}).get("reason")
            out["note"] = f"fp8 was not applied ({reason}): both runs are bf16"
        if "bf16" in frames and "fp8" in frames:
            out["psnr_fp8_vs_bf16_db"] = psnr(frames["fp8"], frames["bf16"])
            value = out["psnr_fp8_vs_bf16_db"]
            out["meets_35db"] = value >= 35 if out["fp8_applied"] and value is not None else None
        for key in ("forward_s", "end_to_end_s", "step_median_s"):
            if bf16.get(key) and fp8.get(key):
                out[f"speedup_{key.removesuffix('_s')}"] = r(bf16[key] / fp8[key], 3)
        return out

    def attention(self) -> dict[str, Any]:
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "needs CUDA"}
        from .accel import enable_fa3, measure_attention_backends

        return {
            "fa3_available": enable_fa3(),
            "tokens": tokens_for(self.frames, self.height, self.width),
            "backends": measure_attention_backends(tokens_for(self.frames, self.height, self.width)),
        }

    def _load_transformer(self, cls_name: str = "WanTransformer3DModel", path: Path | None = None):
        import diffusers
        import torch

        cls = getattr(diffusers, cls_name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls.from_pretrained(path or self.t2v_dir(), subfolder="transformer", dtype=torch.bfloat16).to(device)

    @staticmethod
    def _time_forward(transformer, frames: int, height: int, width: int, reps: int = 3) -> dict[str, Any]:
        import torch

        from .accel import transformer_dummy_inputs

        device = next(transformer.parameters()).device
        inputs = transformer_dummy_inputs(transformer, height, width, frames, device)
        with torch.inference_mode():
            sync()
            t = now()
            out = transformer(**inputs)[0]
            sync()
            first = now() - t
            times = []
            for _ in range(reps):
                t = now()
                transformer(**inputs)
                sync()
                times.append(now() - t)
        tokens = tokens_for(frames, height, width)
        layers = transformer.config.num_layers
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        flops = transformer_flops(tokens, dim=dim, ffn=transformer.config.ffn_dim, layers=layers)
        med = float(np.median(times))
        return {
            "first_call_s": r(first, 2),
            "forward_s": r(med, 4),
            "tflops": r(flops / med / 1e12, 1),
            "tokens": tokens,
            "analytic_tflop": r(flops / 1e12, 1),
            "_out": out.float().cpu(),
        }

    def transformer(self) -> dict[str, Any]:
        """One forward at the job shape per configuration; outputs compared with eager native."""
        import torch

        from .accel import ATTENTION_CANDIDATES, AccelReport, compile_blocks, enable_fa3

        report = AccelReport()

        frames, height, width = self.frames, self.height, self.width
        results: dict[str, Any] = {}
        cuda = torch.cuda.is_available()
        transformer = self._load_transformer()
        results["eager_native"] = base = self._time_forward(transformer, frames, height, width)
        ref = base.pop("_out")
        best = None
        if cuda:
            enable_fa3()
            timings = self.result["sections"].get("attention", {}).get("backends", {})
            usable = {n: v["seconds"] for n, v in timings.items() if v.get("ok")}
            best = min(usable, key=usable.get) if usable else None
            for name in [c for c in ATTENTION_CANDIDATES if c in usable and c != "native"][:3]:
                try:
                    transformer.set_attention_backend(name)
                    res = self._time_forward(transformer, frames, height, width)
                    res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
                    results[f"eager_{name}"] = res
                except Exception as exc:  # noqa: BLE001
                    results[f"eager_{name}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            transformer.set_attention_backend(best or "native")
            fastest = {k: v["forward_s"] for k, v in results.items() if "forward_s" in v}
            if fastest:
                best_eager = min(fastest, key=fastest.get)
                best = best_eager.removeprefix("eager_") if best_eager != "eager_native" else "native"
            transformer.set_attention_backend(best or "native")
            results["best_attention_backend"] = best
            if not self.args.no_compile:
                compile_blocks(transformer, report.compile_errors)
                res = self._time_forward(transformer, frames, height, width)
                res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
                results[f"compiled_{best}"] = res
                try:
                    transformer.fuse_qkv_projections()
                    res = self._time_forward(transformer, frames, height, width)
                    res["rel_err_vs_native"] = r(float((res.pop("_out") - ref).norm() / ref.norm()), 5)
                    results[f"compiled_{best}_fused_qkv"] = res
                except Exception as exc:  # noqa: BLE001
                    results[f"compiled_{best}_fused_qkv"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["accel_report"] = {k: v for k, v in report.as_dict().items() if k != "transformers"}
        del transformer
        return results

    def vae(self) -> dict[str, Any]:
        """Decode one latent video with each precision/setting; PSNR against fp32."""
        import torch
        from diffusers import AutoencoderKLWan

        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = self.t2v_dir()
        lat_frames = (self.frames - 1) // 4 + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        latents = torch.randn(1, 16, lat_frames, self.height // 8, self.width // 8, generator=gen)
        results: dict[str, Any] = {}
        outputs: dict[str, np.ndarray] = {}
        # (name, dtype, cuDNN autotune, channels-last weights, fused norm + SiLU kernels)
        variants = [("fp32", torch.float32, False, False, False), ("bf16", torch.bfloat16, False, False, False)]
        if device == "cuda":
            variants += [
                ("bf16_channels_last_cudnn_benchmark", torch.bfloat16, True, True, False),
                ("bf16_channels_last_fused_norms", torch.bfloat16, True, True, True),
            ]
        for name, dtype, bench, channels_last, fused in variants:
            try:
                torch.backends.cudnn.benchmark = bench
                vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=dtype).to(device)
                from .accel import compile_vae_norms, vae_channels_last

                if channels_last:
                    vae_channels_last(vae)
                if fused:
                    compile_vae_norms(vae)
                x = latents.to(device, dtype)
                times = []
                reset_peak()
                with torch.inference_mode():
                    for _ in range(3 if device == "cuda" else 1):
                        sync()
                        t = now()
                        video = vae.decode(x, return_dict=False)[0]
                        sync()
                        times.append(now() - t)
                frames = ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
                outputs[name] = frames
                results[name] = {
                    "first_s": r(times[0]),
                    "decode_s": r(times[-1]),
                    "peak_gib": gpu_peak_gib(),
                    "psnr_vs_fp32": psnr(frames, outputs.get("fp32")),
                }
                del vae, video, x
                free_cuda()
            except Exception as exc:  # noqa: BLE001
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if device == "cuda":
            results["profile"] = self._profile_vae(path, latents)
        torch.backends.cudnn.benchmark = False
        results["note"] = "random latents through the real VAE config; frames in [0,1]"
        return results

    def _profile_vae(self, path: Path, latents) -> dict[str, Any]:
        """Where the worker's VAE decode spends GPU time: the top kernels by self CUDA time."""
        import torch
        from diffusers import AutoencoderKLWan

        from .accel import optimize_vae

        torch.backends.cudnn.benchmark = True
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.bfloat16).to("cuda")
        optimize_vae(vae, self.settings())
        x = latents.to("cuda", torch.bfloat16)
        with torch.inference_mode():
            vae.decode(x, return_dict=False)
            sync()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                vae.decode(x, return_dict=False)
                sync()
        events = prof.key_averages()
        total = sum(e.self_device_time_total for e in events) or 1
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
        del vae, x
        free_cuda()
        return {
            "gpu_s": r(total / 1e6),
            "top": [
                {
                    "name": e.key[:90],
                    "s": r(e.self_device_time_total / 1e6),
                    "share": r(e.self_device_time_total / total, 3),
                    "calls": e.count,
                }
                for e in top
            ],
        }

    def reference(self) -> dict[str, Any]:
        """Plain diffusers WanPipeline, eager, the worker's dtypes (VAE fp32), same weights/prompt/seed."""
        import torch
        from diffusers import UniPCMultistepScheduler, WanPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        started = now()
        pipe = WanPipeline.from_pretrained(
            self.t2v_dir(),
            local_files_only=True,
            dtype={
                "transformer": torch.bfloat16,
                "text_encoder": torch.bfloat16,
                "vae": torch.float32,
                "default": torch.bfloat16,
            },
        ).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
        load_s = now() - started
        marks: list[float] = []

        def on_step(p, i, t, kwargs):
            sync()
            marks.append(now())
            return {}

        def call(steps: int):
            return pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                height=self.height,
                width=self.width,
                num_frames=self.frames,
                num_inference_steps=steps,
                guidance_scale=self.guidance,
                output_type="np",
                generator=torch.Generator(device=device).manual_seed(SEED),
                callback_on_step_end=on_step,
            )

        call(1)  # warm-up: kernels, cuDNN handles
        marks.clear()
        reset_peak()
        sync()
        t0 = now()
        out = call(self.steps)
        sync()
        total = now() - t0
        self.frames_ref = np.asarray(out.frames[0], dtype=np.float32)
        np.save(self.work / "reference_frames.npy", self.frames_ref.astype(np.float16))  # for a later run's PSNR
        steps = np.diff([t0, *marks])
        res = {
            "load_s": r(load_s, 2),
            "total_s": r(total),
            "steps": len(marks),
            "step_median_s": r(float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0]), 4),
            "first_step_incl_text_encoding_s": r(steps[0]),
            "denoising_s": r(marks[-1] - t0),
            "vae_decode_and_postprocess_s": r(t0 + total - marks[-1]),
            "peak_vram_gib": gpu_peak_gib(),
            "frames_shape": list(self.frames_ref.shape),
            "frames_finite": bool(np.isfinite(self.frames_ref).all()),
            "frames_std": r(float(self.frames_ref.std()), 4),
        }
        tokens = tokens_for(self.frames, self.height, self.width)
        if len(steps) > 1:
            res["tflops_per_step"] = r(
                2 * config_flops(pipe.transformer.config, tokens) / float(np.median(steps[1:])) / 1e12, 1
            )
        return res  # the pipeline and its outputs go with this frame

    def worker_runs(self) -> dict[str, Any]:
        """The worker's job path: uncached (vs reference) and with the step cache (vs uncached)."""
        from .worker import Worker

        res: dict[str, Any] = {}
        started = now()
        worker = Worker(self.settings())
        worker.manager.encoder_pipe()
        res["load_s"] = r(now() - started, 2)
        t = now()
        worker.manager.warm_up(self.width, self.height, self.frames)  # what WARMUP_ON_START does
        res["warm_compile_s"] = r(now() - t, 2)
        pipe = worker.manager.pipeline("t2v")
        warm = run_job(worker, self.job(id="warm", config={"num_inference_steps": 2, "sample_shift": 5.0}))
        warm.pop("_frames", None)
        res["warm_job"] = {k: warm[k] for k in ("status", "total_s", "error") if k in warm}

        if self.frames_ref is None and (self.work / "reference_frames.npy").exists():
            self.frames_ref = np.load(self.work / "reference_frames.npy").astype(np.float32)
            res["reference_frames"] = "from an earlier run's reference section (float16 on disk)"
        uncached = run_job(worker, self.job(id="uncached", step_cache="off"))
        self.frames_worker = uncached.pop("_frames", None)
        uncached["psnr_vs_reference_db"] = psnr(self.frames_worker, self.frames_ref)
        tokens = tokens_for(self.frames, self.height, self.width)
        if uncached.get("step_median_s"):
            flops = 2 * config_flops(pipe.transformer.config, tokens)  # CFG: two forwards a step
            uncached["tflops_per_step"] = r(flops / uncached["step_median_s"] / 1e12, 1)
        res["uncached"] = uncached

        thresholds = [float(x) for x in self.args.cache_thresholds.split(",") if x]
        default = worker.settings.step_cache_threshold
        for threshold in thresholds:
            worker.generator.settings = worker.settings.model_copy(update={"step_cache_threshold": threshold})
            run = run_job(worker, self.job(id=f"cached-{threshold:g}", step_cache="on"))
            frames = run.pop("_frames", None)
            run["psnr_vs_uncached_db"] = psnr(frames, self.frames_worker)
            run["psnr_vs_reference_db"] = psnr(frames, self.frames_ref)
            if uncached.get("step_median_s") and run.get("step_s"):
                # Each step is two forwards (CFG), cached separately; a cached forward costs one
                # block instead of thirty, so a step's time says how many of its two were skipped.
                half = uncached["step_median_s"] / 2
                run["forwards_served_from_cache"] = sum(
                    min(2, max(0, round((2 * half - x) / half))) for x in run["step_s"]
                )
                run["forwards_total"] = 2 * len(run["step_s"])
            res[f"cached_{threshold:g}" + ("_default" if threshold == default else "")] = run
        worker.generator.settings = worker.settings
        res["accel_report"] = worker.manager.accel.as_dict()
        res["resident"] = worker.manager.memory_report()
        failed = [k for k, v in res.items() if isinstance(v, dict) and v.get("status") == "failed"]
        if failed and self.s3 is not None:  # say why the storage refused, not only that it did
            res["s3_log_tail"] = (self.s3.data_dir / "weed.log").read_text(errors="replace")[-3000:]
        self._worker = worker
        return res

    # -- turbo, LoRAs, long videos ------------------------------------------------------------

    def _warm_worker(self, **overrides) -> tuple[Any, dict[str, Any]]:
        """The worker section's warm worker when it ran (and no override asks for another),
        else a new one: models loaded and the default shape compiled, as WARMUP_ON_START does."""
        from .worker import Worker

        if not overrides and getattr(self, "_worker", None) is not None:
            return self._worker, {"worker": "the worker section's (warm)"}
        started = now()
        worker = Worker(self.settings(**overrides))
        worker.manager.encoder_pipe()
        info: dict[str, Any] = {"worker": "new", "load_s": r(now() - started, 2)}
        t = now()
        worker.manager.warm_up(self.width, self.height, self.frames)
        info["warm_compile_s"] = r(now() - t, 2)
        if not overrides:
            self._worker = worker
        return worker, info

    def turbo_job(self, kind: str, **extra) -> dict[str, Any]:
        """``quality: "turbo"`` (its distilled 3 steps, no CFG) at the benchmark shape."""
        job: dict[str, Any] = {
            "job_type": f"{kind}_fast",
            "quality": "turbo",
            "prompt": PROMPT,
            "seed": SEED,
            "width": self.width,
            "height": self.height,
            "user_id": "bench",
        }
        if kind == "video":
            job["frame_num"] = self.frames
        job.update(extra)
        return job

    def _median_runs(self, worker, make_job, runs: int) -> dict[str, Any]:
        """``runs`` jobs end to end (job start to uploaded assets); the median total and the
        median of each stage of the jobs' ``metadata.timings``."""
        rows = []
        for i in range(runs):
            row = run_job(worker, make_job(i))
            row.pop("_frames", None)
            rows.append(row)
        done = [row for row in rows if row["status"] == "completed"]
        out: dict[str, Any] = {"runs": len(rows), "completed": len(done)}
        if len(done) < len(rows):
            out["failed"] = next(row for row in rows if row["status"] != "completed")
        if not done:
            return out
        stages = sorted({k for row in done for k in (row.get("worker_timings") or {})})
        out.update(
            total_s=r(float(np.median([row["total_s"] for row in done]))),
            totals_s=[row["total_s"] for row in done],
            stages_s={
                k: r(float(np.median([(row["worker_timings"] or {}).get(k, 0.0) for row in done]))) for k in stages
            },
            steps=done[0]["steps"],
            step_median_s=r(float(np.median([row["step_median_s"] for row in done if row["step_median_s"]])), 4)
            if any(row["step_median_s"] for row in done)
            else None,
            peak_vram_gib=max((row["peak_vram_gib"] or 0.0) for row in done) or None,
        )
        return out

    def turbo(self) -> dict[str, Any]:
        """``quality: "turbo"`` on the warm worker: a video and an image at the benchmark shape,
        median of N end-to-end runs after one warm-up job each (its transformer compiles on first
        use), and the same run's uncached ``video_fast`` for the speed-up."""
        worker, res = self._warm_worker()
        runs = 1 if self.tiny else self.args.turbo_runs
        for kind in ("video", "image"):
            t = now()
            first = run_job(worker, self.turbo_job(kind, id=f"turbo-{kind}-first"))
            first.pop("_frames", None)
            res[f"{kind}_first_job"] = {k: first.get(k) for k in ("status", "error", "total_s", "output")}
            res[f"{kind}_first_job"]["seconds"] = r(now() - t)
            res[kind] = self._median_runs(worker, lambda i, k=kind: self.turbo_job(k, id=f"turbo-{k}-{i}"), runs)
        res["video"]["shape"] = {"frames": self.frames, "height": self.height, "width": self.width}
        res["image"]["shape"] = {"frames": 1, "height": self.height, "width": self.width}
        fast = (self.result["sections"].get("worker") or {}).get("uncached") or {}
        if fast.get("status") == "completed":
            res["video_fast"] = {"total_s": fast["total_s"], "source": "the worker section (same invocation)"}
        else:
            run = run_job(worker, self.job(id="turbo-vs-fast", step_cache="off"))
            run.pop("_frames", None)
            res["video_fast"] = {
                "total_s": run["total_s"],
                "status": run["status"],
                "steps": run["steps"],
                "source": "run here",
            }
        if res["video"].get("total_s") and res["video_fast"].get("total_s"):
            res["speedup_vs_video_fast"] = r(res["video_fast"]["total_s"] / res["video"]["total_s"], 2)
        res["targets"] = {"video_s": 4.0, "image_s": 0.6}
        if not self.tiny:
            res["meets_targets"] = {
                "video": (res["video"].get("total_s") or math.inf) <= 4.0,
                "image": (res["image"].get("total_s") or math.inf) <= 0.6,
            }
        res["resident"] = worker.manager.memory_report()
        return res

    def turbo_residency(self) -> dict[str, Any]:
        """Everything resident (T2V, VACE, turbo, UMT5; Qwen when written) in a fresh process
        capped at ``--card-gb`` of the card, under ``GPU_MEMORY_BUDGET_GB=--budget-gib``."""
        return self._budget_child("turbo_residency")

    def lora(self) -> dict[str, Any]:
        """Per-job LoRAs on a compiled warm worker of its own (``LORA_DIR`` must exist when the
        models load: slots go in before compile; the main worker stays slot-free so the other
        sections measure the worker as it runs without LoRAs). Two rank-``--lora-rank`` LoRAs on
        every linear layer: first use, a switch between cached ones, the per-step overhead of a
        LoRA against no LoRA, and the graphs compiled after warm-up (must be none)."""
        import torch

        lora_dir = self.work / "loras"
        cfg = json.loads((self.t2v_dir() / "transformer" / "config.json").read_text())
        dims = dict(
            dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], ffn=cfg["ffn_dim"], layers=cfg["num_layers"]
        )
        rank = self.args.lora_rank
        sizes = {
            name: write_lora(lora_dir / f"{name}.safetensors", **dims, rank=rank, seed=seed)
            for seed, name in enumerate(("bench_a", "bench_b"), 1)
        }
        worker, res = self._warm_worker(lora_dir=lora_dir)
        res.update(rank=rank, shapes=dims, file_bytes=sizes, slot_rank=worker.settings.max_lora_rank)
        steps = 2 if self.tiny else self.args.lora_steps

        def job(name: str | None, tag: str) -> dict[str, Any]:
            extra = {"loras": [{"name": name, "scale": 1.0}]} if name else {}
            run = run_job(worker, bench_job(self.width, self.height, self.frames, steps, id=f"lora-{tag}", **extra))
            run.pop("_frames", None)
            timings = run.get("worker_timings") or {}
            denoising = timings.get("denoising")
            return {
                "status": run["status"],
                "error": run.get("error"),
                "total_s": run["total_s"],
                "steps": run["steps"],
                "step_median_s": run["step_median_s"],
                "denoising_per_step_s": r(denoising / run["steps"], 4) if denoising and run["steps"] else None,
                "lora_loading_s": r(timings.get("lora_loading")),
                "lora_switch_s": r(timings.get("lora_switch"), 4),
            }

        res["warm_job"] = job(None, "warm")  # the job shape's remaining first-call costs
        from torch._dynamo.utils import counters

        graphs_before = counters["stats"]["unique_graphs"]
        sequence = [
            ("no_lora_1", None),
            ("first_use_a", "bench_a"),
            ("first_use_b", "bench_b"),
            ("switch_to_a_cached", "bench_a"),
            ("switch_to_b_cached", "bench_b"),
            ("no_lora_2", None),
        ]
        runs = {tag: job(name, tag) for tag, name in sequence}
        res["runs"] = runs
        res["new_graphs_after_warmup"] = counters["stats"]["unique_graphs"] - graphs_before
        res["compiled"] = bool(worker.settings.compile_transformer and torch.cuda.is_available())
        first = runs["first_use_a"]
        res["first_use_s"] = r((first["lora_loading_s"] or 0) + (first["lora_switch_s"] or 0))
        switches = [runs[t]["lora_switch_s"] for t in ("switch_to_a_cached", "switch_to_b_cached")]
        res["switch_cached_s"] = r(max(s for s in switches if s is not None), 4) if any(switches) else None
        with_lora = [runs[t]["step_median_s"] for t, name in sequence if name and runs[t]["step_median_s"]]
        without = [runs[t]["step_median_s"] for t, name in sequence if not name and runs[t]["step_median_s"]]
        if with_lora and without:
            base = float(np.median(without))
            res["step_s"] = {"with_lora": r(float(np.median(with_lora)), 4), "without_lora": r(base, 4)}
            res["per_step_overhead_pct"] = r(100 * (float(np.median(with_lora)) / base - 1), 2)
        main = (self.result["sections"].get("worker") or {}).get("uncached") or {}
        if main.get("step_median_s") and without:
            # the slots' own cost when no LoRA is active: same shape, a worker without slots
            res["slot_free_worker_step_s"] = main["step_median_s"]
            res["slots_idle_overhead_pct"] = r(100 * (float(np.median(without)) / main["step_median_s"] - 1), 2)
        res["targets"] = {"switch_s": 0.5, "per_step_overhead_pct": 5.0, "new_graphs_after_warmup": 0}
        res["all_completed"] = all(v["status"] == "completed" for v in runs.values())
        return res  # its worker goes with this frame

    def long(self) -> dict[str, Any]:
        """Long videos on the warm worker (``duration_seconds``, VACE-continued segments): total
        time, time per segment, peak VRAM and host RSS growth per duration and quality, and
        whether time per segment, VRAM and RSS stay flat as the video gets longer."""
        # --tiny: short segments, so a few seconds at 12 fps make several of them on a CPU
        tiny = dict(segment_frames=13, single_pass_max_frames=13)
        worker, res = self._warm_worker(**tiny) if self.tiny else self._warm_worker()
        durations = [float(d) for d in self.args.long_durations.split(",") if d]
        qualities = [q for q in self.args.long_qualities.split(",") if q]
        fps = 12 if self.tiny else 16
        height, width = (256, 256) if self.tiny else (self.height, self.width)
        steps = 2 if self.tiny else self.args.long_steps
        res.update(fps=fps, height=height, width=width, durations_s=durations, fast_steps=steps)
        for quality in qualities:
            rows: dict[str, Any] = {}
            for duration in durations:
                job = {
                    "job_type": "video_fast",
                    "quality": quality,
                    "prompt": PROMPT,
                    "seed": SEED,
                    "width": width,
                    "height": height,
                    "fps": fps,
                    "duration_seconds": duration,
                    "step_cache": "off",
                    "user_id": "bench",
                    "id": f"long-{quality}-{duration:g}",
                }
                if self.tiny:
                    job["overlap_frames"] = 4
                if quality != "turbo":  # turbo runs its 3 distilled steps; its VACE segments as many
                    job["config"] = {"num_inference_steps": steps}
                rows[f"{duration:g}s"] = self._long_run(worker, job)
            res[quality] = rows
            res[quality]["checks"] = _long_checks(rows[f"{durations[0]:g}s"], rows[f"{durations[-1]:g}s"])
        res["targets"] = {"segment_time_ratio_within": 0.10, "vram_growth_gib_max": 1.0, "rss_growth_gib_max": 2.0}
        return res

    def _long_run(self, worker, job: dict) -> dict[str, Any]:
        with RssSampler() as rss:
            run = run_job(worker, job, keep_metadata=True)
        run.pop("_frames", None)
        out: dict[str, Any] = {
            "status": run["status"],
            "error": run.get("error"),
            "total_s": run["total_s"],
            "peak_vram_gib": run["peak_vram_gib"],
            "rss_before_gib": r(rss.before / GiB, 2),
            "rss_growth_gib": r((rss.peak - rss.before) / GiB, 3),
            "timings": run.get("worker_timings"),
        }
        if run["status"] != "completed":
            out["output"] = run.get("output")
            return out
        meta = run.get("metadata") or {}
        segments = meta.get("segments") or []
        out.update(
            segments=len(segments),
            segment_frames=[s["frames"] for s in segments],
            segment_steps=[s["steps"] for s in segments],
            segment_s=[r(sum(s["timings"].values())) for s in segments],
            worker_peak_vram_gib=meta.get("peak_vram_gib"),
        )
        full = [t for s, t in zip(segments, out["segment_s"], strict=True) if s["frames"] == max(out["segment_frames"])]
        later = full[1:] or full  # segment 1 runs the T2V (or turbo) model, the rest VACE
        out["per_segment_s"] = r(float(np.median(later))) if later else None
        return out

    def cpu_stages(self) -> dict[str, Any]:
        """MP4 + thumbnail + upload, per x264 preset, on the decoded frames and on natural footage."""
        from . import media
        from .storage import Storage

        worker = getattr(self, "_worker", None)
        storage = worker.storage if worker is not None else Storage(self.settings())
        clips = {"natural_clip": natural_clip(self.frames, self.height, self.width)}
        if self.frames_worker is not None:
            clips["decoded_frames"] = self.frames_worker
        presets = self.args.x264_presets.split(",")
        results: dict[str, Any] = {
            "upload_target": "seaweedfs" if self.s3 else "inline (no S3 server)",
            "cpu_count": os.cpu_count(),
        }
        original = media.X264_PRESET
        import imageio.v2 as imageio

        try:
            for clip_name, frames in clips.items():
                for preset in presets:
                    media.X264_PRESET = preset
                    runs = []
                    for rep in range(2):
                        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
                            t = now()
                            enc = media.encode(frames, Path(tmp), as_video=True, fps=16)
                            t_enc = now() - t
                            t = now()
                            storage.store(
                                [
                                    (enc.path, f"bench/{clip_name}-{preset}-{rep}/0.mp4", enc.content_type),
                                    (
                                        enc.thumbnail_path,
                                        f"bench/{clip_name}-{preset}-{rep}/0.thumb.webp",
                                        "image/webp",
                                    ),
                                ]
                            )
                            t_up = now() - t
                            size = enc.path.stat().st_size
                            quality = None
                            if rep == 0:
                                decoded = np.stack([f for f in imageio.get_reader(enc.path)])
                                quality = psnr(decoded, media.to_uint8(frames))
                        runs.append((t_enc, t_up, size, quality))
                    t_enc, t_up, size, quality = runs[-1]
                    results[f"{clip_name}/{preset}"] = {
                        "encode_s": r(t_enc),
                        "upload_s": r(t_up),
                        "total_s": r(t_enc + t_up),
                        "mp4_bytes": size,
                        "mp4_psnr_db": runs[0][3],
                    }
        finally:
            media.X264_PRESET = original
        return results

    def qwen(self) -> dict[str, Any]:
        """Qwen load from disk (the worker's path), decode tokens/s as configured, each decode
        optimisation switched off in turn, and eager with a dynamic cache."""
        import torch

        from .enhance import Enhancer, completion_prompt, generation_kwargs
        from .models import ModelManager

        res: dict[str, Any] = {"page_cache_dropped": drop_page_cache()}
        settings = self.settings()
        manager = ModelManager(settings)
        t = now()
        model, tok = manager.qwen()
        res["load_total_s"] = r(now() - t, 2)
        res["prepare"] = manager.accel.as_dict().get("qwen", {})
        warm = res["prepare"].get("warmup_seconds") or 0.0
        res["load_from_disk_s"] = r(res["load_total_s"] - warm, 2)
        res["device"] = str(next(model.parameters()).device)
        ids = tok(completion_prompt(PROMPT, "video7b_fast_enhanced", "fast"), return_tensors="pt").to(model.device)
        res["prompt_tokens"] = int(ids["input_ids"].shape[1])
        n = 16 if self.tiny else 200
        kwargs = generation_kwargs(tok)

        def gen(new: int, **kw) -> tuple[float, int]:
            """Seconds and new tokens of one greedy generate with the enhancer's settings."""
            sync()
            t = now()
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new, **{**kwargs, **kw})
            sync()
            return now() - t, int(out.shape[1] - ids["input_ids"].shape[1])

        def decode_rate(label: str, repeats: int = 3, **kw) -> dict[str, Any]:
            runs = []
            for _ in range(repeats):
                (t1, _), (tn, got) = gen(1, **kw), gen(n, **kw)
                runs.append(
                    {
                        "prefill_s": r(t1),
                        "new_tokens": got,
                        "generate_s": r(tn),
                        "decode_tok_s": r((got - 1) / (tn - t1), 1),
                    }
                )
            rates = sorted(x["decode_tok_s"] for x in runs)
            return {"label": label, "runs": runs, "decode_tok_s": rates[len(rates) // 2], "min_tok_s": rates[0]}

        reset_peak()
        res["configured"] = decode_rate("as configured", repeats=5)
        res["configured"].update(
            peak_gib=gpu_peak_gib(), cache_implementation=model.generation_config.cache_implementation
        )
        ablations: dict[str, Any] = {}
        if res["prepare"].get("deferred_stop_check"):
            from transformers.generation import utils as gen_utils

            patched = gen_utils.DeferredStopCheck.is_supported
            gen_utils.DeferredStopCheck.is_supported = staticmethod(lambda device, *a, **kw: device.type == "mps")
            try:
                ablations["no_deferred_stop_check"] = decode_rate("stop flag read every token")
            finally:
                gen_utils.DeferredStopCheck.is_supported = patched
        res["ablations"] = ablations
        # eager baseline: dynamic cache, no compile
        m = 8 if self.tiny else 40
        t1, _ = gen(1, disable_compile=True, cache_implementation="dynamic")
        tn, got = gen(m, disable_compile=True, cache_implementation="dynamic")
        res["eager_dynamic"] = {"prefill_s": r(t1), "new_tokens": got, "decode_tok_s": r((got - 1) / (tn - t1), 1)}
        res["speedup"] = r(res["configured"]["decode_tok_s"] / res["eager_dynamic"]["decode_tok_s"], 2)
        # the real enhancer call (random weights: the text is gibberish; timing is what counts)
        enhancer = Enhancer(manager, settings)
        res["enhance_calls"] = []
        for i in range(3):
            e = enhancer.enhance(f"{PROMPT} (bench {i})", "video7b_fast_enhanced", "fast")
            res["enhance_calls"].append(
                {
                    "seconds": r(e.enhancement_time, 2),
                    "new_tokens": e.new_tokens,
                    "tok_s_incl_prefill": r(e.new_tokens / e.enhancement_time, 1) if e.new_tokens else None,
                    "applied": e.enhancement_applied,
                    "reason": e.reason,
                }
            )
        return res  # the model goes with this frame (and the manager that holds it)

    def residency(self) -> dict[str, Any]:
        return self._budget_child("residency")

    def _budget_child(self, child: str) -> dict[str, Any]:
        """A fresh process under the card cap and memory budget (clean peak statistics)."""
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "needs CUDA"}
        env = self._child_env(self.settings(gpu_memory_budget_gb=self.args.budget_gib))
        cmd = [
            sys.executable,
            "-m",
            "wan_worker.bench",
            "--child",
            child,
            "--card-gb",
            str(self.args.card_gb),
            "--residency-steps",
            str(self.args.residency_steps),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            return {"error": f"child exited {proc.returncode}", "stderr": proc.stderr[-4000:]}
        out = json.loads(lines[-1])
        out["child_exit"] = proc.returncode
        return out

    def scaling(self) -> dict[str, Any]:
        """Transformer forward vs shape (eager, best attention backend) and the attention share."""
        import torch

        from .accel import enable_fa3

        cuda = torch.cuda.is_available()
        transformer = self._load_transformer()
        best = self.result["sections"].get("transformer", {}).get("best_attention_backend")
        if cuda and not best:
            from .accel import AccelReport, resolve_attention_backend

            best = resolve_attention_backend(self.settings(), AccelReport())
        if cuda and best and best != "native":
            enable_fa3()
            transformer.set_attention_backend(best)
        shapes = (
            [(9, 256, 256), (17, 256, 256)]
            if self.tiny
            else [(17, 832, 480), (33, 832, 480), (49, 832, 480), (81, 832, 480), (33, 1280, 720), (81, 1280, 720)]
        )
        rows = []
        for frames, height, width in shapes:
            res = self._time_forward(transformer, frames, height, width, reps=2)
            res.pop("_out", None)
            tokens = res["tokens"]
            row = {
                "frames": frames,
                "height": height,
                "width": width,
                **res,
                "attention_flop_share": r(attention_flops(tokens) / transformer_flops(tokens), 3),
            }
            if cuda:
                from .accel import _time_attention

                q, k, v = (torch.randn(1, tokens, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                seconds, _ = _time_attention(best or "native", q, k, v, None)
                row["attention_s_per_forward"] = r(30 * seconds, 4)
                row["attention_time_share"] = r(30 * seconds / res["forward_s"], 3)
                del q, k, v
            rows.append(row)
        base = rows[0]
        for row in rows:
            row["time_vs_first"] = r(row["forward_s"] / base["forward_s"], 2)
            row["tokens_vs_first"] = r(row["tokens"] / base["tokens"], 2)
        del transformer
        return {"backend": best or "native", "rows": rows}

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        s = self.result["sections"]
        w, ref = s.get("worker", {}), s.get("reference", {})
        un = w.get("uncached", {})
        cached = {k: v for k, v in w.items() if k.startswith("cached_")}
        default_cached = next((v for k, v in cached.items() if k.endswith("_default")), None) or next(
            iter(cached.values()), {}
        )
        vae = s.get("vae", {})
        cpu = s.get("cpu_stages", {})
        tr = s.get("transformer", {})
        best_tflops = max((v.get("tflops", 0) for v in tr.values() if isinstance(v, dict)), default=None)
        q = s.get("qwen", {})
        res = s.get("residency", {})
        out = {
            "1_video_fast_uncached_end_to_end_s": un.get("total_s"),
            "1_reference_pipeline_s": ref.get("total_s"),
            "1_speedup_vs_reference": r(ref["total_s"] / un["total_s"], 2)
            if ref.get("total_s") and un.get("total_s")
            else None,
            "2_transformer_best_tflops": best_tflops,
            "2_in_job_tflops_per_step": un.get("tflops_per_step"),
            "3_video_fast_cached_end_to_end_s": default_cached.get("total_s"),
            "3_cached_psnr_vs_uncached_db": default_cached.get("psnr_vs_uncached_db"),
            "4_vae_decode_s": {k: v.get("decode_s") for k, v in vae.items() if isinstance(v, dict) and "decode_s" in v},
            "5_cpu_stages_s": {k: v.get("total_s") for k, v in cpu.items() if isinstance(v, dict) and "total_s" in v},
            "6_cold_start_ready_s": s.get("cold_start", {}).get("ready_s"),
            "fidelity_psnr_vs_reference_db": un.get("psnr_vs_reference_db"),
            "qwen_decode_tok_s": (q.get("configured") or {}).get("decode_tok_s"),
            "qwen_load_from_disk_s": q.get("load_from_disk_s"),
            "residency_peak_gib": res.get("overall_peak_gib"),
        }
        cold = s.get("cold_start", {})
        for key in ("restart_with_compile_cache", "restart_with_artifacts_only"):
            if isinstance(cold.get(key), dict):
                out[f"6_cold_start_{key}_ready_s"] = cold[key].get("ready_s")
        fp8 = s.get("fp8", {})
        if fp8:
            out.update(
                {
                    "7_fp8_applied": fp8.get("fp8_applied"),
                    "7_fp8_psnr_vs_bf16_db": fp8.get("psnr_fp8_vs_bf16_db"),
                    "7_fp8_end_to_end_s": (fp8.get("fp8") or {}).get("end_to_end_s"),
                    "7_bf16_end_to_end_s": (fp8.get("bf16") or {}).get("end_to_end_s"),
                    "7_fp8_speedup_forward": fp8.get("speedup_forward"),
                }
            )
        out.update(self._new_feature_summary(s))
        out["as_shipped"] = self.result.get("versions", {}).get("as_shipped")
        return out

    @staticmethod
    def _new_feature_summary(s: dict[str, Any]) -> dict[str, Any]:
        """Turbo, LoRA and long-video numbers (targets in the sections' ``targets``)."""
        out: dict[str, Any] = {}
        turbo = s.get("turbo", {})
        if turbo:
            out.update(
                {
                    "8_turbo_video_end_to_end_s": (turbo.get("video") or {}).get("total_s"),
                    "8_turbo_image_end_to_end_s": (turbo.get("image") or {}).get("total_s"),
                    "8_turbo_speedup_vs_video_fast": turbo.get("speedup_vs_video_fast"),
                }
            )
        if s.get("turbo_residency"):
            out["8_turbo_all_resident_peak_gib"] = s["turbo_residency"].get("overall_peak_gib")
        lora = s.get("lora", {})
        if lora:
            out.update(
                {
                    "9_lora_first_use_s": lora.get("first_use_s"),
                    "9_lora_switch_cached_s": lora.get("switch_cached_s"),
                    "9_lora_per_step_overhead_pct": lora.get("per_step_overhead_pct"),
                    "9_lora_new_graphs_after_warmup": lora.get("new_graphs_after_warmup"),
                }
            )
        long = s.get("long", {})
        for quality in ("fast", "turbo"):
            rows = long.get(quality)
            if not isinstance(rows, dict):
                continue
            for key, row in rows.items():
                if key != "checks" and isinstance(row, dict):
                    out[f"10_long_{quality}_{key}_total_s"] = row.get("total_s")
                    out[f"10_long_{quality}_{key}_per_segment_s"] = row.get("per_segment_s")
                    out[f"10_long_{quality}_{key}_peak_vram_gib"] = row.get("peak_vram_gib")
            out[f"10_long_{quality}_checks"] = rows.get("checks")
        return out


# --------------------------------------------------------------------------------------------
# child processes (fresh CUDA context, clean memory statistics)


#: Libraries the worker needs only on some paths; importing them at start costs cold start.
HEAVY_MODULES = ("torchao", "fa3_fwd_interface", "torch._inductor", "imageio_ffmpeg", "boto3", "runpod")


def child_cold_start(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    t_proc = psutil.Process().create_time()

    def since() -> float:
        return round(time.time() - t_proc, 2)

    marks: dict[str, Any] = {"interpreter_start_to_main_s": since()}
    import torch

    from . import worker as worker_module

    marks["imports_s"] = since()
    startup_modules = set(sys.modules)
    import diffusers.pipelines.wan  # noqa: F401 - what the first load imports anyway
    import transformers.models.umt5  # noqa: F401

    marks["diffusers_transformers_imported_s"] = since()
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
    marks["cuda_initialised_s"] = since()
    w = worker_module.get_worker()
    w.manager.encoder_pipe()
    marks["models_loaded_s"] = since()
    marks["load_seconds"] = {k: round(v, 2) for k, v in w.manager.load_seconds.items()}
    # what WARMUP_ON_START runs: compile artifacts in, transformer and VAE warm-ups, artifacts out
    w.manager.warm_up(args.width, args.height, args.frames)
    marks["ready_s"] = since()
    marks["warm_compile_s"] = round(marks["ready_s"] - marks["models_loaded_s"], 2)
    report = w.manager.accel.as_dict()
    marks["warmups"] = report.get("warmups")
    marks["compile_artifacts"] = report.get("compile_artifacts")
    marks["compile_enabled"] = w.settings.compile_transformer
    marks["compile_errors"] = report.get("compile_errors")
    marks["precision"] = report.get("precision")
    marks["attention_backend"] = report.get("attention_backend")
    marks["heavy_modules_at_import"] = sorted(m for m in HEAVY_MODULES if m in startup_modules)
    marks["peak_gib"] = gpu_peak_gib()
    return marks


def child_precision_run(args: argparse.Namespace) -> dict[str, Any]:
    """One worker process at the precision its environment sets: load, warm-up compile (timed),
    the benchmark job end to end, one transformer forward; the decoded frames to a file."""
    from .worker import get_worker

    started = now()
    worker = get_worker()
    worker.manager.encoder_pipe()
    out: dict[str, Any] = {"load_s": r(now() - started, 2)}
    started = now()
    worker.manager.warm_up(args.width, args.height, args.frames)
    out["warm_compile_s"] = r(now() - started, 2)
    out["warmups"] = worker.manager.accel.as_dict().get("warmups")
    job = run_job(worker, bench_job(args.width, args.height, args.frames, args.steps, id="precision"))
    frames = job.pop("_frames", None)
    if frames is not None:
        np.save(args.frames_out, np.asarray(frames, dtype=np.float16))
    out["job"] = job
    out["end_to_end_s"] = job.get("total_s")
    out["step_median_s"] = job.get("step_median_s")
    transformer = worker.manager.pipeline("t2v").transformer
    forward = Bench._time_forward(transformer, args.frames, args.height, args.width)
    forward.pop("_out", None)
    out.update(
        forward_s=forward["forward_s"], forward_tflops=forward["tflops"], first_forward_s=forward["first_call_s"]
    )
    out["precision"] = worker.manager.accel.as_dict().get("precision")
    out["compile_errors"] = worker.manager.accel.as_dict().get("compile_errors")
    out["peak_vram_gib"] = gpu_peak_gib()
    return out


def child_residency(args: argparse.Namespace) -> dict[str, Any]:
    """All job types and reference modes under a 48 GB cap and the 44 GiB budget."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, args.card_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    from .worker import get_worker

    worker = get_worker()
    enhancer_peaks: list[float] = []
    real_enhance = worker.enhancer.enhance

    def enhance(*a, **kw):
        out = real_enhance(*a, **kw)
        enhancer_peaks.append(torch.cuda.max_memory_allocated() / GiB)
        return out

    worker.enhancer.enhance = enhance
    w, h = 480, 832
    img = {
        "single": png_data_uri(w, h, (200, 40, 40)),
        "start": png_data_uri(w, h, (40, 200, 40)),
        "end": png_data_uri(w, h, (40, 40, 200)),
    }
    steps = {"num_inference_steps": args.residency_steps}
    jobs: list[tuple[str, dict]] = []
    from .presets import JOB_TYPES

    jobs += [(jt, {"job_type": jt}) for jt in JOB_TYPES]
    jobs += [
        (
            "video_fast+single",
            {"job_type": "video_fast", "reference_mode": "single", "reference_image_url": img["single"]},
        ),
        ("video_fast+start", {"job_type": "video_fast", "reference_mode": "start", "first_frame": img["start"]}),
        ("video_fast+end", {"job_type": "video_fast", "reference_mode": "end", "last_frame": img["end"]}),
        (
            "video_high+both",
            {"job_type": "video_high", "reference_mode": "both", "first_frame": img["start"], "last_frame": img["end"]},
        ),
        (
            "video7b_high_enhanced+both",
            {
                "job_type": "video7b_high_enhanced",
                "reference_mode": "both",
                "first_frame": img["start"],
                "last_frame": img["end"],
            },
        ),
        (
            "image_fast+single",
            {"job_type": "image_fast", "reference_mode": "single", "reference_image_url": img["single"]},
        ),
        ("image_high+start", {"job_type": "image_high", "reference_mode": "start", "first_frame": img["start"]}),
        (
            "image7b_high_enhanced+single",
            {
                "job_type": "image7b_high_enhanced",
                "reference_mode": "single",
                "reference_image_url": img["single"],
                "metadata": {"exact_copy_mode": True},
            },
        ),
    ]
    rows = []
    overall = 0.0
    for name, spec in jobs:
        job = {"prompt": PROMPT, "seed": SEED, "strict_references": True, "config": dict(steps), **spec}
        enhancer_peaks.clear()
        torch.cuda.reset_peak_memory_stats()
        t = now()
        try:
            out = worker.handle({"id": f"res-{len(rows)}", "input": job}, send=lambda p: None)
        except Exception as exc:  # noqa: BLE001
            out = {"error": f"{type(exc).__name__}: {exc}"}
        seconds = now() - t
        peak = max([torch.cuda.max_memory_allocated() / GiB, *enhancer_peaks])
        overall = max(overall, peak)
        meta = out.get("metadata") or {}
        asset = ((out.get("assets") or [{}])[0].get("metadata")) or {}
        rows.append(
            {
                "job": name,
                "status": out.get("status", "failed"),
                "error": out.get("error"),
                "seconds": r(seconds, 1),
                "peak_gib": r(peak, 2),
                "pipeline": asset.get("pipeline"),
                "reference_mode_applied": asset.get("reference_mode_applied"),
                "frames": asset.get("frames"),
                "enhancement_applied": meta.get("enhancement_applied"),
                "enhancement_reason": meta.get("enhancement_reason"),
                "quality_degraded": meta.get("quality_degraded"),
                "resident_after": worker.manager.memory_report().get("resident"),
                "reserved_gib": r(torch.cuda.max_memory_reserved() / GiB, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    moves = [
        {"module": m.module, "to": m.to, "gib": r(m.nbytes / GiB, 2), "s": r(m.seconds, 2)}
        for m in worker.manager.moves
    ]
    return {
        "cap_gb": args.card_gb,
        "cap_fraction": round(fraction, 4),
        "budget_gib": worker.settings.gpu_memory_budget_gb,
        "steps_per_job": args.residency_steps,
        "overall_peak_gib": r(overall, 2),
        "all_completed": all(row["status"] == "completed" for row in rows),
        "jobs": rows,
        "moves": moves,
        "module_gib": {n: r(res.nbytes / GiB, 2) for n, res in worker.manager._modules.items()},
    }


def child_turbo_residency(args: argparse.Namespace) -> dict[str, Any]:
    """Every model resident at once (T2V, VACE, turbo, UMT5, and Qwen when its checkpoint is
    there) under the card cap and budget; turbo, ``video_fast`` and VACE jobs, peak per job."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, args.card_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    from .worker import get_worker

    worker = get_worker()
    manager, s = worker.manager, worker.settings
    load_s: dict[str, Any] = {}
    for name in ("t2v", "vace", "turbo"):
        t = now()
        manager.pipeline(name)
        load_s[name] = r(now() - t, 1)
    manager.encoder_pipe()
    if (Path(s.models_dir) / Path(s.qwen_model).name).is_dir():
        t = now()
        manager.qwen()
        load_s["qwen"] = r(now() - t, 1)
    after_load = {"allocated_gib": r(torch.cuda.memory_allocated() / GiB, 2), **manager.memory_report()}
    w, h, frames = 480, 832, 81
    steps = {"num_inference_steps": args.residency_steps}
    base = {"prompt": PROMPT, "seed": SEED, "width": w, "height": h, "user_id": "bench"}
    jobs = [
        ("video_turbo", {"job_type": "video_fast", "quality": "turbo", "frame_num": frames}),
        ("image_turbo", {"job_type": "image_fast", "quality": "turbo"}),
        ("video_fast", {"job_type": "video_fast", "frame_num": frames, "config": dict(steps)}),
        (
            "video_fast+single",
            {
                "job_type": "video_fast",
                "frame_num": frames,
                "config": dict(steps),
                "reference_mode": "single",
                "reference_image_url": png_data_uri(w, h, (200, 40, 40)),
                "strict_references": True,
            },
        ),
        ("video_turbo_again", {"job_type": "video_fast", "quality": "turbo", "frame_num": frames}),
    ]
    rows, overall = [], 0.0
    for name, spec in jobs:
        torch.cuda.reset_peak_memory_stats()
        t = now()
        try:
            out = worker.handle({"id": f"tres-{len(rows)}", "input": {**base, **spec}}, send=lambda p: None)
        except Exception as exc:  # noqa: BLE001
            out = {"error": f"{type(exc).__name__}: {exc}"}
        peak = torch.cuda.max_memory_allocated() / GiB
        overall = max(overall, peak)
        rows.append(
            {
                "job": name,
                "status": out.get("status", "failed"),
                "error": out.get("error"),
                "seconds": r(now() - t, 2),
                "peak_gib": r(peak, 2),
                "resident_after": manager.memory_report().get("resident"),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "cap_gb": args.card_gb,
        "cap_fraction": round(fraction, 4),
        "budget_gib": s.gpu_memory_budget_gb,
        "steps_per_fast_job": args.residency_steps,
        "load_s": load_s,
        "after_load": after_load,
        "overall_peak_gib": r(overall, 2),
        "meets_44gib": overall <= 44.0,
        "all_completed": all(row["status"] == "completed" for row in rows),
        "jobs": rows,
        "moves": [{"module": m.module, "to": m.to, "gib": r(m.nbytes / GiB, 2)} for m in manager.moves],
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wan_worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny profile (CI)")
    p.add_argument("--out", help="write the JSON here (also printed)")
    p.add_argument("--work-dir", help="scratch folder (default: a new temp folder)")
    p.add_argument("--models-dir", help="where the random-weight checkpoints are written / reused")
    p.add_argument("--tiny-models-dir", help="--tiny: reuse tiny checkpoints here (default: MODELS_DIR/tiny)")
    p.add_argument(
        "--models",
        default=",".join(FULL_MODELS),
        help=f"which full-size checkpoints to write ({','.join(FULL_MODELS)})",
    )
    p.add_argument(
        "--sections",
        "--section",
        default="",
        help="comma list of sections to run (default: all; coldstart = cold_start)",
    )
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16", help="PRECISION of the cold_start workers")
    p.add_argument("--frames-out", help=argparse.SUPPRESS)
    p.add_argument("--s3", choices=["weed", "none"], default="weed", help="upload to a local SeaweedFS, or inline")
    p.add_argument("--height", type=int, default=832)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cache-thresholds", default="0.08,0.2,0.35", help="step-cache thresholds to run (comma list)")
    p.add_argument("--x264-presets", default="medium,veryfast")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled transformer variants")
    p.add_argument("--budget-gib", type=float, default=44.0)
    p.add_argument("--card-gb", type=float, default=48.0)
    p.add_argument("--residency-steps", type=int, default=2)
    p.add_argument("--turbo-runs", type=int, default=3, help="turbo: end-to-end runs per job (median; 1 with --tiny)")
    p.add_argument("--lora-rank", type=int, default=32, help="lora: rank of the two benchmark LoRAs")
    p.add_argument("--lora-steps", type=int, default=10, help="lora: denoising steps of its video_fast jobs")
    p.add_argument(
        "--long-steps", type=int, default=8, help="long: steps of the fast-quality segments (turbo runs its 3)"
    )
    p.add_argument("--long-durations", default="15,60", help="long: durations in seconds (--tiny: 2,3)")
    p.add_argument("--long-qualities", default="fast,turbo", help="long: qualities to run (comma list)")
    p.add_argument(
        "--child",
        choices=["cold_start", "residency", "turbo_residency", "precision_run"],
        help=argparse.SUPPRESS,
    )
    args = p.parse_args(argv)
    aliases = {"coldstart": "cold_start"}
    if args.tiny and args.long_durations == "15,60":
        args.long_durations = "2,3"
    args.section_order = [aliases.get(s.strip(), s.strip()) for s in args.sections.split(",") if s.strip()]
    args.sections = set(args.section_order)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = sorted(set(args.models) - set(FULL_MODELS))
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(FULL_MODELS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        fn = {
            "cold_start": child_cold_start,
            "residency": child_residency,
            "turbo_residency": child_turbo_residency,
            "precision_run": child_precision_run,
        }[args.child]
        print(json.dumps(fn(args), default=str), flush=True)
        return 0
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = Bench(args).run()
    print(json.dumps(result.get("summary", {}), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
