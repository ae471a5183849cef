"""Per-job LoRAs: ``.safetensors`` files under ``LORA_DIR``, swapped into fixed adapter slots.

Why fixed slots and hot swap (not ``set_adapters`` over one adapter per file): the regional
compile (accel.py) traces each block with its submodules. Injecting a new PEFT adapter
changes those submodules, and ``set_adapters`` rewrites each layer's scale as a Python float;
both are graph guards, so every new file or scale would recompile. Instead, each
transformer gets ``MAX_LORAS_PER_JOB`` zero adapters ("slots") of rank ``MAX_LORA_RANK`` on
every linear layer *before* it is compiled (``prepare_transformer``, with diffusers'
``enable_lora_hotswap`` so scales are tensors). A job's LoRAs are copied into the slots with
diffusers' ``hotswap=True`` (same shapes, same graph), scaled in place, and only the slots
in use are active. After the job the adapters are disabled, which makes every layer call its
base layer alone, so a job without LoRAs computes exactly what it computes on a fresh worker.

Files are converted by diffusers' own Wan loader (``WanLoraLoaderMixin.lora_state_dict``:
diffusers/PEFT, ComfyUI/Kijai and musubi layouts) and kept in an LRU cache on the worker's
device, bounded by ``LORA_CACHE_GB`` and counted in the model manager's memory budget.
A ``<name>.json`` sidecar may carry sampling defaults (steps, guidance, flow shift, sampler).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wan_worker.contract import presets as P
from wan_worker.contract.errors import InvalidInput
from wan_worker.contract.settings import Settings

if TYPE_CHECKING:
    from wan_worker.contract.jobs import Job, LoraRequest
    from wan_worker.runtime.models import ModelManager

log = logging.getLogger(__name__)

SLOT_PREFIX = "wan_lora_slot_"
SUFFIX = ".safetensors"


class LoraDefaults(BaseModel):
    """A ``<name>.json`` sidecar: sampling defaults a (distillation) LoRA was trained for."""

    model_config = ConfigDict(strict=True, extra="forbid")

    steps: int | None = Field(default=None, ge=P.STEPS_MIN, le=P.STEPS_MAX)
    guidance_scale: float | None = Field(default=None, ge=P.GUIDANCE_MIN, le=P.GUIDANCE_MAX, allow_inf_nan=False)
    flow_shift: float | None = Field(default=None, ge=P.SHIFT_MIN, le=P.SHIFT_MAX, allow_inf_nan=False)
    sampler: Literal["unipc", "dmd"] | None = None
    #: DMD only: the distilled timesteps; default ``steps`` evenly spaced down from 1000.
    timesteps: list[Annotated[int, Field(ge=1, le=1000)]] | None = Field(default=None, min_length=1, max_length=8)


@dataclass
class LoraFile:
    """A resolved, readable LoRA file and what the job needs from it."""

    request: LoraRequest
    path: Path
    sha256: str
    defaults: LoraDefaults | None
    cache_key: tuple[str, int, int]


@dataclass
class CachedWeights:
    state_dict: dict[str, torch.Tensor]  # diffusers layout: "transformer.<module>.lora_A/B.weight"
    metadata: dict | None
    nbytes: int


class LoraError(Exception):
    """A LoRA file that can't be used; the caller turns it into ``InvalidInput`` for a field."""


# -- files ---------------------------------------------------------------------------------------


def resolve_file(lora_dir: Path, name: str) -> Path:
    """``LORA_DIR/<name>.safetensors``, refusing anything that leaves ``LORA_DIR`` (symlinks too)."""
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise LoraError("must be a plain file stem under LORA_DIR")
    root = lora_dir.resolve()
    path = lora_dir / f"{name}{SUFFIX}"
    if not path.exists():
        raise LoraError(f"no LoRA named '{name}' in LORA_DIR (see action 'list_loras')")
    real = path.resolve()
    if not real.is_relative_to(root):
        raise LoraError(f"'{name}' resolves outside LORA_DIR")
    if not real.is_file():
        raise LoraError(f"'{name}{SUFFIX}' is not a regular file")
    return real


def read_sidecar(lora_dir: Path, name: str) -> LoraDefaults | None:
    path = lora_dir / f"{name}.json"
    if not path.exists():
        return None
    if not path.resolve().is_relative_to(lora_dir.resolve()):
        raise LoraError(f"sidecar {name}.json resolves outside LORA_DIR")
    try:
        return LoraDefaults.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'sidecar'}: {e['msg']}" for e in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise LoraError(f"bad sidecar {name}.json: {detail}") from None


_PREFIX = re.compile(r"^(transformer\.|diffusion_model\.|lora_unet_)")
_BLOCK_INDEX = re.compile(r"blocks([._])\d+[._]")
_DOWN = re.compile(r"[._](lora_A|lora_down)\.weight$")


def describe(path: Path) -> dict[str, Any]:
    """Format, rank and targeted module kinds from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        downs = {k: f.get_slice(k).get_shape() for k in keys if _DOWN.search(k)}
    if any(k.startswith("diffusion_model.") for k in keys):
        fmt = "comfyui"
    elif any(k.startswith("lora_unet_") for k in keys):
        fmt = "musubi"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "diffusers"
    else:
        fmt = "unknown"
    # "transformer.blocks.3.attn1.to_q.lora_A.weight" -> "attn1.to_q"; vace_blocks keep their prefix
    modules = (_BLOCK_INDEX.sub(r"blocks\1", _DOWN.sub("", _PREFIX.sub("", k))) for k in downs)
    targets = sorted({re.sub(r"^blocks[._]", "", m) for m in modules})
    return {
        "format": fmt,
        "rank": max((int(s[0]) for s in downs.values() if s), default=None),
        "targets": targets,
        "tensors": len(keys),
    }


# -- slots on a transformer ----------------------------------------------------------------------


def prepare_transformer(transformer: torch.nn.Module, settings: Settings) -> int:
    """Give a transformer its LoRA slots before it is compiled; 0 when LoRAs are off.

    Slots are added only when ``LORA_DIR`` exists at load time, so a worker that serves no
    LoRAs runs exactly the code it ran before. (If it appears later, the first LoRA job adds
    the slots, and a compiled transformer then recompiles once.)
    """
    if settings.max_loras_per_job == 0 or not settings.lora_dir.is_dir():
        return 0
    return add_slots(transformer, settings.max_loras_per_job, settings.max_lora_rank)


def slot_names(transformer: torch.nn.Module) -> list[str]:
    return sorted(n for n in getattr(transformer, "peft_config", {}) if n.startswith(SLOT_PREFIX))


def add_slots(transformer: torch.nn.Module, count: int, rank: int) -> int:
    """``count`` disabled zero adapters of ``rank`` on every linear layer (idempotent)."""
    if slot_names(transformer):
        return len(slot_names(transformer))
    started = time.perf_counter()
    linears = [
        (name, m.in_features, m.out_features, m.weight.dtype, m.weight.device)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    for i in range(count):
        zeros: dict[str, torch.Tensor] = {}
        for name, fan_in, fan_out, dtype, device in linears:
            zeros[f"{name}.lora_A.weight"] = torch.zeros(rank, fan_in, dtype=dtype, device=device)
            zeros[f"{name}.lora_B.weight"] = torch.zeros(fan_out, rank, dtype=dtype, device=device)
        # scales become tensors (and ranks padded) so later swaps keep a compiled graph
        transformer.enable_lora_hotswap(target_rank=rank, check_compiled="ignore")
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.load_lora_adapter(zeros, prefix=None, adapter_name=f"{SLOT_PREFIX}{i}")
    names = slot_names(transformer)
    _activate_slots(_lora_layers(transformer), names)  # frozen weights, as every later call sees them
    transformer.disable_lora()
    transformer._wan_lora_slots = [None] * count  # what each slot holds: (sha256, scale)
    log.info(
        "LoRA slots added",
        extra={
            "transformer": type(transformer).__name__,
            "slots": count,
            "rank": rank,
            "layers": len(linears),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return count


@contextlib.contextmanager
def slots_active(transformer: torch.nn.Module, count: int) -> Iterator[bool]:
    """The first ``count`` slots on, as they hold (empty after load), for a warm-up forward that
    compiles the graph a job with ``count`` LoRAs runs; yields False when there are no slots."""
    names = slot_names(transformer)[:count]
    if not names:
        yield False
        return
    _activate_slots(_lora_layers(transformer), names)
    transformer.enable_lora()
    try:
        yield True
    finally:
        transformer.disable_lora()


def _lora_layers(transformer: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}


def check_fits(state_dict: dict[str, torch.Tensor], layers: dict[str, Any], max_rank: int) -> None:
    """Every tensor must be a lora_A/lora_B of a linear layer this transformer has, with its shape."""
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("transformer."):
            raise LoraError(f"has weights for '{key.split('.')[0]}', but Wan LoRAs apply to the transformer only")
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise LoraError(f"unsupported tensor '{key}' (only lora_A/lora_B weights; LoRA biases are not supported)")
        layer = layers.get(module)
        if layer is None:
            raise LoraError(f"targets '{module}', which this transformer has no linear layer for")
        base = layer.get_base_layer()
        if tensor.ndim != 2:
            raise LoraError(f"{key} has {tensor.ndim} dimensions, expected 2")
        if kind == "A.weight" and tensor.shape[1] != base.in_features:
            raise LoraError(
                f"shape mismatch at {module}: lora_A is {tuple(tensor.shape)} but the layer takes {base.in_features} inputs"
            )
        if kind == "B.weight" and tensor.shape[0] != base.out_features:
            raise LoraError(
                f"shape mismatch at {module}: lora_B is {tuple(tensor.shape)} but the layer has {base.out_features} outputs"
            )
        ranks.setdefault(module, {})[kind] = tensor.shape[0] if kind == "A.weight" else tensor.shape[1]
    if not ranks:
        raise LoraError("contains no LoRA weights for the transformer")
    for module, pair in ranks.items():
        if len(pair) != 2 or pair["A.weight"] != pair["B.weight"]:
            raise LoraError(f"{module}: lora_A and lora_B don't pair up ({pair})")
        if pair["A.weight"] > max_rank:
            raise LoraError(f"rank {pair['A.weight']} at {module} exceeds MAX_LORA_RANK={max_rank}")


# -- the runtime ---------------------------------------------------------------------------------


class LoraRuntime:
    """Resolves a job's LoRAs, caches their converted weights, and swaps them in for a call."""

    def __init__(self, manager: ModelManager, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        self._cache: OrderedDict[tuple[str, int, int], CachedWeights] = OrderedDict()
        self._sha: dict[tuple[str, int, int], str] = {}
        self._lock = threading.RLock()

    # -- listing ------------------------------------------------------------------------------

    def describe_all(self) -> dict[str, Any]:
        """``{"action": "list_loras"}``: every ``.safetensors`` in ``LORA_DIR``, from headers only."""
        root = self.settings.lora_dir
        found: list[dict[str, Any]] = []
        if root.is_dir():
            for path in sorted(root.glob(f"*{SUFFIX}")):
                name = path.name[: -len(SUFFIX)]
                entry: dict[str, Any] = {"name": name}
                try:
                    real = resolve_file(root, name)
                    entry["size_bytes"] = real.stat().st_size
                    entry.update(describe(real))
                    defaults = read_sidecar(root, name)
                    entry["defaults"] = defaults.model_dump(exclude_none=True) if defaults else None
                except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
                    entry["error"] = str(exc) if isinstance(exc, LoraError) else f"unreadable: {type(exc).__name__}"
                found.append(entry)
        return {
            "loras": found,
            "lora_dir": str(root),
            "max_loras_per_job": self.settings.max_loras_per_job,
            "max_lora_rank": self.settings.max_lora_rank,
        }

    # -- before the job -------------------------------------------------------------------------

    def prepare(self, job: Job) -> list[dict[str, Any]]:
        """Check the job's LoRAs, load them into the cache, apply sidecar sampling defaults.

        Returns ``loras_applied`` for the asset metadata. Every problem is ``InvalidInput``
        naming ``loras[i].name`` (or ``config.loras[i].name``).
        """
        if not job.loras:
            return []
        s = self.settings
        where = job.loras[0].field.rsplit("[", 1)[0]
        if s.fuse_qkv:
            # fused q/k/v projections bypass the per-projection LoRA layers: refuse rather than half-apply
            raise InvalidInput(f"{where}: this worker runs with FUSE_QKV=true, which LoRAs can't apply to", field=where)
        if len(job.loras) > s.max_loras_per_job:
            raise InvalidInput(
                f"{where}: at most {s.max_loras_per_job} LoRAs per job (MAX_LORAS_PER_JOB), got {len(job.loras)}",
                field=where,
            )
        seen: set[str] = set()
        files = []
        for req in job.loras:
            if req.name in seen:
                raise InvalidInput(f"{req.field}.name: '{req.name}' is listed twice", field=f"{req.field}.name")
            seen.add(req.name)
            with _naming(req):
                files.append(self._file(req))
        for lora in files:
            with _naming(lora.request):
                self._weights(lora)
        _apply_defaults(job, files)
        return [{"name": f.request.name, "scale": f.request.scale, "sha256": f.sha256} for f in files]

    def _file(self, req: LoraRequest) -> LoraFile:
        root = self.settings.lora_dir
        path = resolve_file(root, req.name)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            sha = self._sha.get(key)
        if sha is None:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
            sha = digest.hexdigest()
            with self._lock:
                self._sha[key] = sha
        return LoraFile(req, path, sha, read_sidecar(root, req.name), key)

    def _weights(self, lora: LoraFile) -> CachedWeights:
        """The converted weights, from the cache or the file (then cached, LRU-bounded)."""
        with self._lock:
            cached = self._cache.get(lora.cache_key)
            if cached is not None:
                self._cache.move_to_end(lora.cache_key)
                return cached
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        try:
            state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(str(lora.path), return_lora_metadata=True)
        except Exception as exc:  # noqa: BLE001 - corrupt file or a layout diffusers can't convert
            raise LoraError(f"not a readable LoRA safetensors file ({type(exc).__name__}: {str(exc)[:200]})") from None
        device = self.manager.device
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
        cached = CachedWeights(state_dict, metadata, sum(v.numel() * v.element_size() for v in state_dict.values()))
        limit = int(self.settings.lora_cache_gb * 1024**3)
        with self._lock:
            if cached.nbytes <= limit:
                self._cache[lora.cache_key] = cached
                while sum(c.nbytes for c in self._cache.values()) > limit:
                    evicted, _ = self._cache.popitem(last=False)
                    log.info("LoRA evicted from cache", extra={"path": evicted[0]})
            self.manager.account("lora_cache", self.cache_bytes())
        return cached

    def cache_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._cache.values())

    # -- around the denoising call --------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, transformer: torch.nn.Module, job: Job) -> Iterator[float | None]:
        """The job's LoRAs active on ``transformer`` for the block; yields the switch seconds
        (None for a job without LoRAs). Afterwards the adapters are disabled."""
        if not job.loras:
            yield None
            return
        with self._lock:
            started = time.perf_counter()
            self._activate(transformer, job)
            seconds = time.perf_counter() - started
            try:
                yield seconds
            finally:
                transformer.disable_lora()

    def _activate(self, transformer: torch.nn.Module, job: Job) -> None:
        s = self.settings
        if not slot_names(transformer):
            log.warning("LoRA slots added after load; a compiled transformer recompiles once")
            add_slots(transformer, s.max_loras_per_job, s.max_lora_rank)
        slots = slot_names(transformer)
        layers = _lora_layers(transformer)
        held: list = transformer._wan_lora_slots
        for i, req in enumerate(job.loras):
            with _naming(req):
                lora = self._file(req)
                weights = self._weights(lora)
                check_fits(weights.state_dict, layers, s.max_lora_rank)
                if held[i] == (lora.sha256, req.scale):
                    continue
                held[i] = None
                try:
                    transformer.load_lora_adapter(
                        weights.state_dict,
                        prefix="transformer",
                        adapter_name=slots[i],
                        hotswap=True,
                        metadata=weights.metadata,
                    )
                    with torch.no_grad():
                        for layer in layers.values():
                            if req.scale != 1.0 and slots[i] in layer.scaling:
                                layer.scaling[slots[i]].mul_(req.scale)
                except torch.OutOfMemoryError:
                    _zero_slot(layers, slots[i])
                    transformer.disable_lora()
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever peft refuses: the slot is emptied
                    _zero_slot(layers, slots[i])
                    transformer.disable_lora()
                    raise LoraError(f"could not be swapped in: {type(exc).__name__}: {str(exc)[:200]}") from None
                held[i] = (lora.sha256, req.scale)
        _activate_slots(layers, slots[: len(job.loras)])
        transformer.enable_lora()


def _activate_slots(layers: dict[str, Any], names: list[str]) -> None:
    """Only the slots a job uses compute; ``inference_mode`` keeps every adapter weight frozen."""
    for layer in layers.values():
        layer.set_adapter(names, inference_mode=True)


def _zero_slot(layers: dict[str, Any], slot: str) -> None:
    with torch.no_grad():
        for layer in layers.values():
            for part in (layer.lora_A, layer.lora_B):
                if slot in part:
                    part[slot].weight.zero_()


@contextlib.contextmanager
def _naming(req: LoraRequest) -> Iterator[None]:
    """A ``LoraError`` becomes ``InvalidInput`` for ``<field>.name``."""
    try:
        yield
    except LoraError as exc:
        field = f"{req.field}.name"
        raise InvalidInput(f"{field}: LoRA '{req.name}': {exc}", field=field) from None


def _apply_defaults(job: Job, files: list[LoraFile]) -> None:
    """Sidecar defaults fill what the job did not set itself; two sidecars must agree. A turbo
    job keeps its fixed distilled schedule, so sidecars' sampling defaults don't apply to it."""
    if job.quality == "turbo":
        return
    for lora in files:
        if lora.defaults is None:
            continue
        field = f"{lora.request.field}.name"
        for key, value in lora.defaults.model_dump(exclude_none=True).items():
            value = tuple(value) if isinstance(value, list) else value
            source = job.sampling_sources.get(key, "")
            if source.startswith(("config.", "exact_copy_mode")):
                continue  # the job's own value wins
            if source.startswith("lora:") and getattr(job, key) != value:
                raise InvalidInput(
                    f"{field}: its sidecar sets {key}={value}, but {source} already set {getattr(job, key)}",
                    field=field,
                )
            setattr(job, key, value)
            job.sampling_sources[key] = f"lora:{lora.request.name}"
    if job.sampler == "dmd" and job.quality != "turbo":
        _dmd_schedule(job)


def _dmd_schedule(job: Job) -> None:
    """A distillation LoRA's DMD schedule on the base model: its timesteps, one forward each."""
    if job.timesteps is None:
        job.timesteps = tuple(round(1000 - i * 1000 / job.steps) for i in range(job.steps))
    job.steps = len(job.timesteps)
