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
import inspect
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wan_worker.contract.errors import ModelUnavailable
from wan_worker.contract.settings import Settings
from wan_worker.infra import pagecache
from wan_worker.runtime.accel import AccelReport
from wan_worker.runtime.locate import DOWNLOAD_HINT, ModelLocator

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


#: Config keys that record how a file was written, not what the model is.
_PROVENANCE_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures")


def _config(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _PROVENANCE_KEYS}


def check_shared_configs(base: Path, other: Path, repo_id: str) -> None:
    """Refuse a checkpoint whose text encoder or VAE differ from the base model's: its
    transformer would run on embeddings and latents it wasn't trained with. A folder without
    these configs (only the transformer downloaded) is taken as sharing them."""
    for component in ("text_encoder", "vae"):
        theirs, ours = other / component / "config.json", base / component / "config.json"
        if not theirs.is_file() or not ours.is_file():
            continue
        a, b = _config(ours), _config(theirs)
        differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if differing:
            raise ModelUnavailable(
                f"{repo_id} at {other} has a different {component} from the base model "
                f"({component}/config.json differs in: {', '.join(differing[:8])}); it can't share "
                "the resident one",
                retryable=False,
            )


def _module_kind(key: str) -> str:
    """``blocks.3.attn1.to_gate_compress.weight`` -> ``attn1.to_gate_compress``."""
    parts = [p for p in key.split(".")[:-1] if not p.isdigit() and p != "blocks"]
    return ".".join(parts)


class _DropUnusedWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "were not used when initializing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_unused_weights() -> Iterator[None]:
    """diffusers warns with every unused key name (hundreds); the loader logs one summary instead."""
    target = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _DropUnusedWeightsWarning()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def _weights(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.safetensors"))


@dataclass
class ModelManager:
    settings: Settings
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    moves: list[Move] = field(default_factory=list)
    load_seconds: dict[str, float] = field(default_factory=dict)
    #: What the speed features chose and measured for this manager's models (``accel.py``).
    accel: AccelReport = field(default_factory=AccelReport)

    def __post_init__(self) -> None:
        self.locator = ModelLocator(self.settings)
        self._modules: dict[str, Resident] = {}
        self._accounted: dict[str, int] = {}  # device bytes held outside modules (the LoRA cache)
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
        return "t2v" in self._pipes  # the denoiser and UMT5

    @property
    def qwen_loaded(self) -> bool:
        return self._qwen is not None

    @property
    def vae_dtype(self) -> torch.dtype:
        """``VAE_DTYPE`` on a GPU. On a CPU (the tiny profile) always float32: CPU bf16 3-D
        convolutions have no fast kernels, and a 9-frame 256x256 decode took 4.5x longer."""
        return getattr(torch, self.settings.vae_dtype) if self.device.type == "cuda" else torch.float32

    def encoder_pipe(self):
        """The full ``WanPipeline`` (the denoiser's modules plus UMT5); used for ``encode_prompt``."""
        with self._lock:
            if "t2v" not in self._pipes:
                self._load_text_encoder()
            return self._pipes["t2v"]

    def _t2v_path(self) -> Path:
        return self.locator.resolve(self.settings.t2v_model_id)

    def _load_errors(self, path: Path):
        hint = f". Re-download with: {DOWNLOAD_HINT.format(models_dir=self.settings.models_dir)}"
        return load_errors(self.settings.t2v_model_id, path, hint=hint, refresh_worker=True)

    def _load_denoiser(self):
        """The T2V checkpoint without its text encoder: transformer, VAE, scheduler, tokenizer.
        UMT5 (three quarters of the bytes) loads separately, so a warm-up can compile the
        transformer while UMT5's checkpoint is still being read (``warm_up``)."""
        from diffusers import WanPipeline

        path = self._t2v_path()
        started = time.perf_counter()
        with self._load_errors(path):
            pipe = WanPipeline.from_pretrained(
                path,
                text_encoder=None,
                local_files_only=True,
                **self._load_placement(path / "transformer", path / "vae"),
                dtype={"transformer": torch.bfloat16, "vae": self.vae_dtype, "default": torch.bfloat16},
            )
        pipe.set_progress_bar_config(disable=True)
        from wan_worker.runtime.accel import optimize_vae

        self._install_transformer("transformer", pipe.transformer)
        self.accel.vae = optimize_vae(pipe.vae, self.settings, self.accel.compile_errors)
        self._register("vae", pipe.vae)
        self._pipes["t2v_denoise"] = pipe
        self.load_seconds["wan"] = time.perf_counter() - started
        log.info(
            "loaded WAN transformer and VAE", extra={"seconds": round(self.load_seconds["wan"], 2), "path": str(path)}
        )
        return pipe

    def _load_text_encoder(self) -> None:
        from diffusers import WanPipeline
        from transformers import UMT5EncoderModel

        base = self._denoise_pipe("t2v_denoise")
        path = self._t2v_path()
        started = time.perf_counter()
        with self._load_errors(path):
            text_encoder = UMT5EncoderModel.from_pretrained(
                path,
                subfolder="text_encoder",
                local_files_only=True,
                dtype=torch.bfloat16,
                **self._load_placement(path / "text_encoder"),
            )
        # the same pipeline ``from_pretrained`` would give: every component and config value of
        # the denoiser, UMT5 added (``from_pipe`` would re-cast the modules kept in float32)
        init = inspect.signature(WanPipeline.__init__).parameters
        kwargs = {k: base.components[k] if k in base.components else base.config[k] for k in init if k in base.config}
        pipe = WanPipeline(**{**kwargs, "text_encoder": text_encoder})
        pipe.set_progress_bar_config(disable=True)
        self._register("text_encoder", text_encoder)
        self._pipes["t2v"] = pipe
        self.load_seconds["text_encoder"] = time.perf_counter() - started
        log.info("loaded UMT5", extra={"seconds": round(self.load_seconds["text_encoder"], 2), "path": str(path)})

    def _denoise_pipe(self, name: str):
        """A pipeline with no text encoder, sharing the resident modules."""
        from diffusers import WanPipeline, WanVACEPipeline, WanVideoToVideoPipeline

        with self._lock:
            if name in self._pipes:
                return self._pipes[name]
            if name == "t2v_denoise":
                return self._load_denoiser()
            base = self._denoise_pipe("t2v_denoise")
            common = dict(tokenizer=base.tokenizer, text_encoder=None, vae=base.vae, scheduler=base.scheduler)
            if name == "i2i":
                pipe = WanVideoToVideoPipeline(transformer=base.transformer, **common)
            elif name == "vace":
                pipe = WanVACEPipeline(transformer=self._load_vace_transformer(), **common)
            elif name == "turbo":
                pipe = WanPipeline(transformer=self._load_turbo_transformer(), **common)
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
        self._install_transformer("vace_transformer", transformer)
        self.load_seconds["vace"] = time.perf_counter() - started
        return transformer

    def _load_turbo_transformer(self):
        """Only the distilled transformer: it was distilled against the base model's UMT5 and VAE,
        which stay shared (checked, not assumed). The sparse-attention gate weights
        (``to_gate_compress``) that dense attention doesn't use are dropped, and logged once."""
        from diffusers import WanTransformer3DModel

        repo_id = self.settings.turbo_model_id
        fetch = f"{DOWNLOAD_HINT.format(models_dir=self.settings.models_dir)} --only-turbo"
        path = self.locator.resolve(repo_id, fetch_command=fetch)
        check_shared_configs(self.locator.resolve(self.settings.t2v_model_id), path, repo_id)
        started = time.perf_counter()
        with load_errors(repo_id, path, hint=f". Re-download with: {fetch}"), _quiet_unused_weights():
            transformer, info = WanTransformer3DModel.from_pretrained(
                path,
                subfolder="transformer",
                local_files_only=True,
                dtype=torch.bfloat16,
                output_loading_info=True,
                **self._load_placement(path / "transformer"),
            )
        skipped = sorted(info.get("unexpected_keys") or [])
        if skipped:
            log.info(
                "turbo checkpoint: weights unused by dense attention skipped",
                extra={"count": len(skipped), "modules": sorted({_module_kind(k) for k in skipped})},
            )
        self._install_transformer("turbo_transformer", transformer)
        self.load_seconds["turbo"] = time.perf_counter() - started
        return transformer

    def model_id(self, name: str) -> str:
        """The checkpoint whose transformer a pipeline name runs (for the job's metadata)."""
        s = self.settings
        return {"vace": s.vace_model_id, "turbo": s.turbo_model_id}.get(name, s.t2v_model_id)

    def pipeline(self, name: str):
        """``t2v``, ``turbo``, ``vace`` or ``i2i``: the denoising pipeline for a job, loaded on first use."""
        return self._denoise_pipe("t2v_denoise" if name == "t2v" else name)

    def warm_up(self, width: int, height: int, frames: int) -> None:
        """Load WAN (and Qwen with WARMUP_QWEN, the turbo transformer with DEFAULT_QUALITY=turbo)
        and compile for the default video shape now, so the first job doesn't pay for it
        (WARMUP_ON_START). A missing turbo checkpoint is logged, not fatal: the other qualities
        still serve.

        The start is disk-bound, so the order matters: background threads read the T2V weights
        into the page cache (transformer, VAE, then UMT5, three quarters of the bytes) while the
        transformer and VAE load and compile; UMT5 then loads from memory. (Loading UMT5 itself
        in a thread is not safe: ``from_pretrained`` initialises on the meta device through
        process-wide patches.)
        """
        from wan_worker.runtime.accel import (
            inductor_cache_dir,
            load_compile_artifacts,
            save_compile_artifacts,
            warm_transformer,
            warm_vae,
        )

        compiles = self.device.type == "cuda" and (self.settings.compile_transformer or self.settings.compile_vae)
        if compiles:
            self.accel.compile_artifacts = load_compile_artifacts(self.settings)  # before anything compiles
        if compiles and not self.wan_loaded:
            path = self._t2v_path()
            loaded = "t2v_denoise" in self._pipes  # e.g. a retry after UMT5 failed to load
            parts = ("text_encoder",) if loaded else ("transformer", "vae", "text_encoder")
            weights = [f for sub in parts for f in _weights(path / sub)]
            self.accel.checkpoint_read_ahead = pagecache.Reader(pagecache.whole_files(weights)).stats
        pipe = self.pipeline("t2v")
        transformers = [("transformer", pipe.transformer)]
        if self.settings.default_quality == "turbo":
            try:
                transformers.append(("turbo_transformer", self.pipeline("turbo").transformer))
            except ModelUnavailable as exc:
                log.warning("turbo transformer not loaded at warm-up", extra={"reason": exc.message})
        if self.settings.compile_transformer and self.device.type == "cuda":
            from wan_worker.runtime.loras import slots_active

            for name, transformer in transformers:
                self.acquire([name], working_bytes=estimate_working_bytes(width, height, frames))
                self.accel.warmups.append(warm_transformer(transformer, height, width, frames))
                with slots_active(transformer, 1) as has_slots:  # the one-LoRA graph too
                    if has_slots:
                        self.accel.warmups.append(warm_transformer(transformer, height, width, frames))
        if self.settings.compile_vae and self.device.type == "cuda":
            self.acquire(["vae"], working_bytes=estimate_working_bytes(width, height, 5))
            self.accel.warmups.append(warm_vae(pipe.vae, height, width))
        self.encoder_pipe()
        if self.settings.warmup_qwen:
            self.qwen()
        if compiles:
            # everything compiled so far, Qwen's decode included
            self.accel.compile_artifacts = save_compile_artifacts(self.settings, self.accel.compile_artifacts)
        caches = (inductor_cache_dir(),) if compiles else ()
        self.accel.startup_files = pagecache.record_startup_files(self.settings.compile_cache_dir, caches)
        if pagecache.startup_reader is not None:
            self.accel.startup_files["prefetched_at_start"] = pagecache.startup_reader.stats.as_dict()

    def ready(self, name: str) -> bool:
        """Whether a job of this pipeline would load nothing (every job encodes its prompt)."""
        return self.wan_loaded and ("t2v_denoise" if name == "t2v" else name) in self._pipes

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
                from wan_worker.runtime.accel import prepare_qwen
                from wan_worker.runtime.decoding import generation_kwargs

                self._register("qwen", model)
                # on its device: warms the decode graph
                self.accel.qwen = prepare_qwen(model, self.settings, generation_kwargs(tokenizer))
                self._qwen = (model, tokenizer)
                self.load_seconds["qwen"] = time.perf_counter() - started
            return self._qwen

    def _load_placement(self, *paths: Path) -> dict[str, Any]:
        """``from_pretrained`` kwargs that load straight onto the GPU, after making room for the
        checkpoint under the budget. Loading to CPU memory first and then moving costs a second
        full copy through pageable memory (about 10 s for Qwen2.5-7B on an H100 host)."""
        if self.device.type != "cuda":
            return {}
        self.acquire([], working_bytes=sum(f.stat().st_size for path in paths for f in _weights(path)))
        return {"device_map": str(self.device)}

    # -- residency ----------------------------------------------------------------------------

    def _install_transformer(self, role: str, transformer: torch.nn.Module) -> None:
        """LoRA slots (before compile), then attention, precision and compile; resident as ``role``."""
        from wan_worker.runtime.accel import optimize_transformer
        from wan_worker.runtime.loras import prepare_transformer

        prepare_transformer(transformer, self.settings)
        self.accel.transformers.append(optimize_transformer(transformer, self.settings, self.accel, role))
        self._register(role, transformer)

    def _register(self, name: str, module: torch.nn.Module) -> None:
        device = next(module.parameters()).device
        self._modules[name] = Resident(module, module_bytes(module), on_device=device.type == self.device.type)
        self.acquire([name], working_bytes=0)

    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self._modules.values() if r.on_device) + sum(self._accounted.values())

    def account(self, name: str, nbytes: int) -> None:
        """Device memory held outside registered modules (e.g. cached LoRA weights), counted in the budget."""
        with self._lock:
            self._accounted[name] = nbytes

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
            "accounted_gib": {n: round(b / GiB, 3) for n, b in self._accounted.items()},
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
