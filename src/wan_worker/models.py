"""Model loading (``full`` | ``tiny`` profiles) and GPU residency under a memory budget.

The ``ModelManager`` is the only owner of GPU state. It loads each model lazily, once per
worker process, and keeps it resident. Before each stage it is told which modules the
stage needs and roughly how much working memory; modules that are not needed move to CPU
memory (never to disk) in least-recently-used order until the stage fits the budget.

The text encoder runs as its own stage (``encode_prompt``), so the denoising pipelines are
built *without* a text encoder and take prompt embeddings. That keeps one copy of UMT5 and
the VAE shared by the T2V, VACE and image-to-image pipelines, and lets the encoder leave
the GPU while the transformer works when the budget asks for it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tiny
from .errors import ModelUnavailable
from .settings import Settings

log = logging.getLogger(__name__)

GiB = 1024**3
DOWNLOAD_HINT = "python builder/download_models.py --models-dir {models_dir}"


@dataclass
class Move:
    module: str
    to: str  # "device" (onto the GPU) or "cpu" (offloaded to host memory)
    nbytes: int
    seconds: float


@dataclass
class Resident:
    module: torch.nn.Module
    nbytes: int
    on_device: bool = False
    last_used: float = 0.0


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def estimate_working_bytes(width: int, height: int, frames: int) -> int:
    """Activation memory of one generation, from the token count (calibrated on an H100).

    Transformer activations grow with the 32,760 tokens of 480x832x81; the VAE decode
    grows with output pixels. They don't overlap in time, so the larger one counts.
    """
    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames * (height // 16) * (width // 16)
    transformer = tokens * 160 * 1024
    vae_decode = frames * height * width * 150
    return max(transformer, vae_decode) + GiB


@dataclass
class ModelLocator:
    """Where a checkpoint lives: a local directory, ``MODELS_DIR`` or the HF cache."""

    settings: Settings

    def resolve(self, repo_id: str) -> Path:
        s = self.settings
        if Path(repo_id).is_dir():  # an explicit local checkpoint wins in every profile
            return Path(repo_id)
        if s.model_profile == "tiny":
            root = tiny.ensure_tiny_models(s.tiny_models_dir)
            return root / Path(repo_id).name
        candidates = [root / name for root in (s.models_dir, s.baked_models_dir) for name in (repo_id, Path(repo_id).name)]
        for path in candidates:
            if path.is_dir() and any(path.iterdir()):
                return path
        from huggingface_hub import snapshot_download

        cache_dirs = [None, Path("/runpod-volume/huggingface-cache/hub")]
        if s.hf_home:
            cache_dirs.insert(0, s.hf_home / "hub")
        for cache_dir in cache_dirs:
            try:
                return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
            except Exception:  # noqa: BLE001 - any miss means "not in this cache"
                continue
        raise ModelUnavailable(
            f"model weights for {repo_id} not found in {s.models_dir} or the Hugging Face cache; "
            f"download them with: {DOWNLOAD_HINT.format(models_dir=s.models_dir)} "
            "(or mount a network volume at /runpod-volume)",
            retryable=False,
        )


@dataclass
class ModelManager:
    settings: Settings
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    moves: list[Move] = field(default_factory=list)
    load_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.locator = ModelLocator(self.settings)
        self._modules: dict[str, Resident] = {}
        self._pipes: dict[str, Any] = {}
        self._qwen: tuple[Any, Any] | None = None
        self._lock = threading.RLock()
        if self.settings.gpu_memory_budget_gb is not None:
            self.budget_bytes = int(self.settings.gpu_memory_budget_gb * GiB)
        elif self.device.type == "cuda":
            self.budget_bytes = torch.cuda.get_device_properties(self.device).total_memory
        else:
            self.budget_bytes = 1 << 62  # CPU: nothing to budget

    # -- loading ------------------------------------------------------------------------------

    @property
    def wan_loaded(self) -> bool:
        return "t2v" in self._pipes

    @property
    def qwen_loaded(self) -> bool:
        return self._qwen is not None

    @property
    def vae_dtype(self) -> torch.dtype:
        return getattr(torch, self.settings.vae_dtype)

    def encoder_pipe(self):
        """The full ``WanPipeline`` as loaded; used for ``encode_prompt`` only."""
        with self._lock:
            if "t2v" not in self._pipes:
                self._load_t2v()
            return self._pipes["t2v"]

    def _load_t2v(self) -> None:
        from diffusers import WanPipeline

        path = self.locator.resolve(self.settings.t2v_model_id)
        started = time.perf_counter()
        try:
            pipe = WanPipeline.from_pretrained(
                path,
                local_files_only=True,
                dtype={
                    "transformer": torch.bfloat16,
                    "text_encoder": torch.bfloat16,
                    "vae": self.vae_dtype,
                    "default": torch.bfloat16,
                },
            )
        except Exception as exc:  # noqa: BLE001 - a corrupt or partial directory
            raise ModelUnavailable(
                f"could not load {self.settings.t2v_model_id} from {path}: {type(exc).__name__}: {exc}. "
                f"Re-download with: {DOWNLOAD_HINT.format(models_dir=self.settings.models_dir)}",
                refresh_worker=True,
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        from .accel import optimize_transformer, optimize_vae

        optimize_transformer(pipe.transformer, self.settings)
        optimize_vae(pipe.vae, self.settings)
        self._register("text_encoder", pipe.text_encoder)
        self._register("transformer", pipe.transformer)
        self._register("vae", pipe.vae)
        self._pipes["t2v"] = pipe
        self.load_seconds["wan"] = time.perf_counter() - started
        log.info("loaded WAN text-to-video", extra={"seconds": round(self.load_seconds["wan"], 2), "path": str(path)})

    def _denoise_pipe(self, name: str):
        """A pipeline view with no text encoder, sharing the resident modules."""
        from diffusers import WanPipeline, WanVACEPipeline, WanVideoToVideoPipeline

        with self._lock:
            if name in self._pipes:
                return self._pipes[name]
            base = self.encoder_pipe()
            common = dict(tokenizer=base.tokenizer, text_encoder=None, vae=base.vae, scheduler=base.scheduler)
            if name == "t2v_denoise":
                pipe = WanPipeline(transformer=base.transformer, **common)
            elif name == "i2i":
                pipe = WanVideoToVideoPipeline(transformer=base.transformer, **common)
            elif name == "vace":
                pipe = WanVACEPipeline(transformer=self._load_vace_transformer(), **common)
            else:
                raise KeyError(name)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[name] = pipe
            return pipe

    def _load_vace_transformer(self):
        from diffusers import WanVACETransformer3DModel

        path = self.locator.resolve(self.settings.vace_model_id)
        started = time.perf_counter()
        try:
            transformer = WanVACETransformer3DModel.from_pretrained(
                path, subfolder="transformer", local_files_only=True, dtype=torch.bfloat16
            )
        except Exception as exc:  # noqa: BLE001
            raise ModelUnavailable(
                f"could not load {self.settings.vace_model_id} from {path}: {type(exc).__name__}: {exc}",
                refresh_worker=True,
            ) from exc
        from .accel import optimize_transformer

        optimize_transformer(transformer, self.settings)
        self._register("vace_transformer", transformer)
        self.load_seconds["vace"] = time.perf_counter() - started
        return transformer

    def pipeline(self, name: str):
        """``t2v``, ``vace`` or ``i2i``: the denoising pipeline for a job, loaded on first use."""
        return self._denoise_pipe("t2v_denoise" if name == "t2v" else name)

    def warm_up(self, width: int, height: int, frames: int) -> None:
        """Load WAN (and Qwen with WARMUP_QWEN) and compile for the default video shape now,
        so the first job doesn't pay for it (WARMUP_ON_START)."""
        from .accel import warm_transformer

        transformer = self.pipeline("t2v").transformer
        if self.settings.compile_transformer and self.device.type == "cuda":
            self.acquire(["transformer"], working_bytes=estimate_working_bytes(width, height, frames))
            warm_transformer(transformer, height, width, frames)
        if self.settings.warmup_qwen:
            self.qwen()

    def ready(self, name: str) -> bool:
        return ("t2v_denoise" if name == "t2v" else name) in self._pipes

    def qwen(self) -> tuple[Any, Any]:
        """(model, tokenizer) of the prompt enhancer, loaded on first use."""
        with self._lock:
            if self._qwen is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = self.locator.resolve(self.settings.qwen_model)
                started = time.perf_counter()
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.bfloat16)
                except Exception as exc:  # noqa: BLE001
                    raise ModelUnavailable(
                        f"could not load {self.settings.qwen_model} from {path}: {type(exc).__name__}: {exc}"
                    ) from exc
                model.eval()
                from .accel import prepare_qwen

                self._register("qwen", model)
                prepare_qwen(model, self.settings)  # on its device: warms the decode graph
                self._qwen = (model, tokenizer)
                self.load_seconds["qwen"] = time.perf_counter() - started
            return self._qwen

    # -- residency ----------------------------------------------------------------------------

    def _register(self, name: str, module: torch.nn.Module) -> None:
        self._modules[name] = Resident(module, module_bytes(module))
        self.acquire([name], working_bytes=0)

    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self._modules.values() if r.on_device)

    def acquire(self, names: list[str], working_bytes: int) -> None:
        """Make ``names`` resident on the device, evicting LRU modules to fit the budget."""
        with self._lock:
            needed = [n for n in names if n in self._modules]
            need_bytes = sum(self._modules[n].nbytes for n in needed if not self._modules[n].on_device)
            evictable = sorted(
                (n for n, r in self._modules.items() if r.on_device and n not in needed),
                key=lambda n: self._modules[n].last_used,
            )
            while evictable and self.resident_bytes() + need_bytes + working_bytes > self.budget_bytes:
                self._move(evictable.pop(0), to_device=False)
            if self.resident_bytes() + need_bytes + working_bytes > self.budget_bytes:
                log.warning(
                    "memory budget exceeded",
                    extra={"budget_gib": round(self.budget_bytes / GiB, 1), "need_gib": round(need_bytes / GiB, 1)},
                )
            now = time.monotonic()
            for n in needed:
                if not self._modules[n].on_device:
                    self._move(n, to_device=True)
                self._modules[n].last_used = now

    def _move(self, name: str, *, to_device: bool) -> None:
        resident = self._modules[name]
        target = self.device if to_device else torch.device("cpu")
        started = time.perf_counter()
        resident.module.to(target)
        resident.on_device = to_device
        if not to_device and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.moves.append(Move(name, "device" if to_device else "cpu", resident.nbytes, time.perf_counter() - started))

    def free_memory(self) -> None:
        """After an out-of-memory error: drop cached blocks so a retry starts clean."""
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "device": str(self.device),
            "resident": sorted(n for n, r in self._modules.items() if r.on_device),
            "offloaded": sorted(n for n, r in self._modules.items() if not r.on_device),
            "budget_gib": round(self.budget_bytes / GiB, 2) if self.budget_bytes < 1 << 60 else None,
        }
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            report.update(
                gpu_allocated_gib=round(torch.cuda.memory_allocated(self.device) / GiB, 2),
                gpu_free_gib=round(free / GiB, 2),
                gpu_total_gib=round(total / GiB, 2),
                gpu_peak_gib=round(torch.cuda.max_memory_allocated(self.device) / GiB, 2),
            )
        return report
