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

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelUnavailable
from .locate import DOWNLOAD_HINT, ModelLocator
from .settings import Settings

log = logging.getLogger(__name__)

GiB = 1024**3


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


@contextlib.contextmanager
def load_errors(repo_id: str, path: Path, hint: str = "", refresh_worker: bool = False) -> Iterator[None]:
    """A checkpoint that fails to load (corrupt, partial, wrong format) becomes a clear
    ``ModelUnavailable``. Out-of-memory passes through unchanged: models load straight onto
    the GPU, and that error belongs to the degrade path, not to "re-download"."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelUnavailable(
            f"could not load {repo_id} from {path}: {type(exc).__name__}: {exc}{hint}", refresh_worker=refresh_worker
        ) from exc


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
        hint = f". Re-download with: {DOWNLOAD_HINT.format(models_dir=self.settings.models_dir)}"
        with load_errors(self.settings.t2v_model_id, path, hint=hint, refresh_worker=True):
            pipe = WanPipeline.from_pretrained(
                path,
                local_files_only=True,
                **self._load_placement(path),
                dtype={
                    "transformer": torch.bfloat16,
                    "text_encoder": torch.bfloat16,
                    "vae": self.vae_dtype,
                    "default": torch.bfloat16,
                },
            )
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
        with load_errors(self.settings.vace_model_id, path, refresh_worker=True):
            transformer = WanVACETransformer3DModel.from_pretrained(
                path,
                subfolder="transformer",
                local_files_only=True,
                dtype=torch.bfloat16,
                **self._load_placement(path / "transformer"),
            )
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
        from .accel import load_compile_artifacts, save_compile_artifacts, warm_transformer, warm_vae

        compiles = self.device.type == "cuda" and (self.settings.compile_transformer or self.settings.compile_vae)
        if compiles:
            load_compile_artifacts(self.settings)  # before anything compiles
        pipe = self.pipeline("t2v")
        if self.settings.compile_transformer and self.device.type == "cuda":
            self.acquire(["transformer"], working_bytes=estimate_working_bytes(width, height, frames))
            warm_transformer(pipe.transformer, height, width, frames)
        if self.settings.compile_vae and self.device.type == "cuda":
            self.acquire(["vae"], working_bytes=estimate_working_bytes(width, height, 5))
            warm_vae(pipe.vae, height, width)
        if self.settings.warmup_qwen:
            self.qwen()
        if compiles:
            save_compile_artifacts(self.settings)  # everything compiled so far, Qwen's decode included

    def ready(self, name: str) -> bool:
        return ("t2v_denoise" if name == "t2v" else name) in self._pipes

    def qwen(self) -> tuple[Any, Any]:
        """(model, tokenizer) of the prompt enhancer, loaded on first use."""
        with self._lock:
            if self._qwen is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = self.locator.resolve(self.settings.qwen_model)
                started = time.perf_counter()
                with load_errors(self.settings.qwen_model, path):
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModelForCausalLM.from_pretrained(
                        path, local_files_only=True, dtype=torch.bfloat16, **self._load_placement(path)
                    )
                model.eval()
                from .accel import prepare_qwen
                from .enhance import generation_kwargs

                self._register("qwen", model)
                prepare_qwen(
                    model, self.settings, generation_kwargs(tokenizer)
                )  # on its device: warms the decode graph
                self._qwen = (model, tokenizer)
                self.load_seconds["qwen"] = time.perf_counter() - started
            return self._qwen

    def _load_placement(self, path: Path) -> dict[str, Any]:
        """``from_pretrained`` kwargs that load straight onto the GPU, after making room for the
        checkpoint under the budget. Loading to CPU memory first and then moving costs a second
        full copy through pageable memory (about 10 s for Qwen2.5-7B on an H100 host)."""
        if self.device.type != "cuda":
            return {}
        checkpoint = sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))
        self.acquire([], working_bytes=checkpoint)
        return {"device_map": str(self.device)}

    # -- residency ----------------------------------------------------------------------------

    def _register(self, name: str, module: torch.nn.Module) -> None:
        device = next(module.parameters()).device
        self._modules[name] = Resident(module, module_bytes(module), on_device=device.type == self.device.type)
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
