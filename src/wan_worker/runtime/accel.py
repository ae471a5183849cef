"""Speed features, all built on diffusers' and transformers' own hooks.

* **Attention backend** - ``ATTENTION_BACKEND=auto`` (default) times the backends that load
  on this machine on the real attention shape once per process and keeps the fastest; an
  explicit name is used if it works, else native SDPA. FlashAttention-3 is used through
  diffusers' own ``_flash_3`` backend when an FA3 build is importable (``flash_attn_interface``
  or the forward-only ``fa3_fwd_interface`` wheel).
* **Regional compile** - each repeated transformer block's ``forward`` is compiled once
  (``fullgraph=True, dynamic=False``) and the graph is shared by all blocks of that class.
  It is the *forward* that is compiled (not ``module.compile()``), so diffusers' cache hooks,
  which wrap ``forward``, stay eager around it and step caching works with compile.
  ``warm_transformer`` runs one forward per shape so the first job does not pay for it.
* **Precision** - ``PRECISION=fp8`` runs each block's self-attention through FA3's FP8 kernel
  and its linears in float8 (``fp8.py``); without a Hopper GPU, the FA3 wheel or torchao it
  stays bf16 and the report's ``precision`` says why.
* **Compile artifacts** - ``torch.compiler``'s portable cache, loaded before the warm-up and
  saved after it under ``COMPILE_CACHE_DIR`` (the network volume), so a new worker skips most
  of the compile.
* **Step cache** - diffusers' first-block cache for one pipeline call (``step_cache``).
* **VAE** - cuDNN autotuning and channels-last weights for the causal 3-D convolutions, and
  each norm + SiLU fused into one compiled kernel (``optimize_vae``, ``warm_vae``).
* **Qwen** - transformers' static cache plus its own generation compile
  (``generation_config.compile_config``: ``torch.compile`` with CUDA graphs for the decode
  step only), warmed once at load time so no job pays the compile inside its time bound, and
  transformers' deferred stop check so the host never waits for the GPU between tokens.

Every choice made here is returned to the caller, which records it in an ``AccelReport``
(``ModelManager.accel``: one per manager, no module state) for health and the benchmark.
Changes to diffusers' and transformers' own code live in ``patches.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wan_worker.contract.settings import Settings
from wan_worker.infra.pagecache import ReadStats
from wan_worker.runtime import patches
from wan_worker.runtime.patches import enable_fa3

log = logging.getLogger(__name__)

#: Backends tried by ``auto``, best first when timings tie.
ATTENTION_CANDIDATES = ("_flash_3", "_native_cudnn", "native", "_native_flash", "_native_efficient")
#: The attention shape ``auto`` times: 480x832, 81 frames -> 21 x 30 x 52 = 32,760 tokens.
DEFAULT_TOKENS, HEADS, HEAD_DIM = 32_760, 12, 128


# -- the report ----------------------------------------------------------------------------------


def _set(**items: Any) -> dict[str, Any]:
    """The items that are set (not ``None``)."""
    return {k: v for k, v in items.items() if v is not None}


@dataclass
class PrecisionReport:
    """What ``PRECISION`` asked for, what runs, why not, and what each transformer got (by role)."""

    requested: str
    applied: str
    reason: str | None = None
    modules: dict[str, dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return _set(requested=self.requested, applied=self.applied, reason=self.reason, modules=self.modules)


@dataclass
class TransformerAccel:
    """What ``optimize_transformer`` did to one transformer."""

    class_name: str
    role: str = "transformer"  # the model manager's name for it: transformer, vace_transformer, ...
    attention_backend: str | None = None
    precision: str | None = None
    fused_qkv: bool | str | None = None  # True, or "failed: ..."
    compiled_blocks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "role": self.role,
            "attention_backend": self.attention_backend,
            "precision": self.precision,
            **_set(fused_qkv=self.fused_qkv, compiled_blocks=self.compiled_blocks),
        }


@dataclass
class VaeAccel:
    """What ``optimize_vae`` did (nothing without CUDA)."""

    cudnn_benchmark: bool | None = None
    channels_last_convs: int | None = None
    fused_norms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return _set(
            cudnn_benchmark=self.cudnn_benchmark,
            vae_channels_last_convs=self.channels_last_convs,
            vae_fused_norms=self.fused_norms,
        )


@dataclass
class QwenAccel:
    """What ``prepare_qwen`` did: decode compile on or off, and why."""

    compile: bool = False
    deferred_stop_check: bool | None = None
    warmup_seconds: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "compile": self.compile,
            **_set(deferred_stop_check=self.deferred_stop_check, warmup_seconds=self.warmup_seconds, error=self.error),
        }


@dataclass
class AccelReport:
    """What one model manager chose and measured; ``as_dict`` is what health and the benchmark show.

    The attention backend and the precision are decided once per report (the first transformer
    loaded) and reused for the others.
    """

    attention_resolved: bool = False
    attention_backend: str | None = None
    fa3_available: bool | None = None
    attention_timings: dict[str, dict] | None = None
    attention_fallbacks: list[dict[str, str]] = field(default_factory=list)
    precision: PrecisionReport | None = None
    transformers: list[TransformerAccel] = field(default_factory=list)
    vae: VaeAccel = field(default_factory=VaeAccel)
    compile_errors: dict[str, str] = field(default_factory=dict)
    compile_artifacts: dict[str, Any] | None = None
    warmups: list[dict[str, Any]] = field(default_factory=list)
    qwen: QwenAccel | None = None
    #: the T2V weights read into the page cache during the warm-up (``ModelManager.warm_up``)
    checkpoint_read_ahead: ReadStats | None = None
    #: the start's library files, recorded after the warm-up for the next start (``pagecache``)
    startup_files: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _set(fa3_available=self.fa3_available, attention_timings=self.attention_timings)
        if self.attention_resolved:
            out["attention_backend"] = self.attention_backend
        if self.attention_fallbacks:
            out["attention_fallbacks"] = list(self.attention_fallbacks)
        if self.precision is not None:
            out["precision"] = self.precision.as_dict()
        if self.transformers:
            out["transformers"] = [t.as_dict() for t in self.transformers]
        out.update(self.vae.as_dict())
        if self.compile_errors:
            out["compile_errors"] = dict(self.compile_errors)
        if self.compile_artifacts is not None:
            out["compile_artifacts"] = self.compile_artifacts
        if self.warmups:
            out["warmups"] = list(self.warmups)
        if self.qwen is not None:
            out["qwen"] = self.qwen.as_dict()
        if self.checkpoint_read_ahead is not None:
            out["checkpoint_read_ahead"] = self.checkpoint_read_ahead.as_dict()
        if self.startup_files is not None:
            out["startup_files"] = self.startup_files
        return out


# -- attention ---------------------------------------------------------------------------------


def _time_attention(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor | None
) -> tuple[float, float]:
    """Median seconds of one attention call through diffusers' dispatcher, and its error vs ``ref``."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def call() -> torch.Tensor:
        return dispatch_attention_fn(q, k, v, backend=backend)

    out = call()  # also loads the kernel
    err = 0.0 if ref is None else float((out.float() - ref.float()).norm() / ref.float().norm())
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[2], err


def measure_attention_backends(
    tokens: int = DEFAULT_TOKENS, candidates: tuple[str, ...] = ATTENTION_CANDIDATES, text_len: int = 512
) -> dict[str, dict]:
    """Each usable backend on one Wan block's two attentions: self (tokens x tokens) and cross
    (tokens x text_len). Seconds per block, TFLOP/s of the self-attention, error vs native."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    fa3 = enable_fa3()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(n: int) -> torch.Tensor:
        return torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v = randn(tokens), randn(tokens), randn(tokens)
    kc, vc = randn(text_len), randn(text_len)
    flops = 4 * tokens * tokens * HEADS * HEAD_DIM
    ref = dispatch_attention_fn(q, k, v, backend="native")
    ref_cross = dispatch_attention_fn(q, kc, vc, backend="native")
    results: dict[str, dict] = {}
    for name in candidates:
        if name == "_flash_3" and not fa3:
            results[name] = {"ok": False, "error": "no FA3 build importable"}
            continue
        try:
            self_s, err = _time_attention(name, q, k, v, ref)
            cross_s, err_cross = _time_attention(name, q, kc, vc, ref_cross)
        except Exception as exc:  # noqa: BLE001 - a backend that does not load is skipped
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        results[name] = {
            "ok": max(err, err_cross) < 2e-2,
            "seconds": round(self_s + cross_s, 5),
            "self_s": round(self_s, 5),
            "cross_s": round(cross_s, 5),
            "self_tflops": round(flops / self_s / 1e12, 1),
            "rel_err": round(max(err, err_cross), 5),
        }
    del q, k, v, kc, vc, ref, ref_cross
    torch.cuda.empty_cache()
    return results


def pick_backend(timings: dict[str, dict], margin: float = 0.05) -> str | None:
    """FA3 when it loads and is at least as fast as native SDPA; otherwise native, unless another
    backend is clearly (``margin``) faster. The margin keeps the choice stable across restarts,
    so the on-disk compile cache keeps hitting (a different backend is a different graph)."""
    usable = {n: r["seconds"] for n, r in timings.items() if r.get("ok")}
    if not usable:
        return None
    native = usable.get("native")
    if native is None:
        return min(usable, key=usable.get)
    if "_flash_3" in usable and usable["_flash_3"] <= native:
        return "_flash_3"
    best = min(usable, key=usable.get)
    return best if usable[best] < (1 - margin) * native else "native"


def resolve_attention_backend(settings: Settings, report: AccelReport) -> str | None:
    """The backend to set on every transformer of this report's manager (``None``: diffusers'
    default); measured and recorded in ``report`` once."""
    if report.attention_resolved:
        return report.attention_backend
    wanted = settings.attention_backend
    chosen: str | None = None
    if wanted and torch.cuda.is_available():
        if wanted in ("_flash_3", "auto"):
            report.fa3_available = enable_fa3()
        if wanted == "auto":
            try:
                timings = measure_attention_backends()
                report.attention_timings = timings
                chosen = pick_backend(timings)
            except Exception as exc:  # noqa: BLE001 - measurement itself failed: stay on native
                log.warning("attention backend measurement failed", extra={"reason": f"{type(exc).__name__}: {exc}"})
        else:
            chosen = wanted
    report.attention_resolved, report.attention_backend = True, chosen
    return chosen


def _set_backend(transformer: torch.nn.Module, backend: str | None, report: AccelReport) -> str | None:
    if not backend or backend == "native":
        return "native" if backend else None
    try:
        transformer.set_attention_backend(backend)
        return backend
    except Exception as exc:  # noqa: BLE001 - a missing kernel package falls back to native SDPA
        log.warning("attention backend unavailable, using native", extra={"backend": backend, "reason": str(exc)})
        report.attention_fallbacks.append({"backend": backend, "reason": str(exc)[:200]})
        return "native"


# -- precision ---------------------------------------------------------------------------------------


def apply_precision(
    transformer: torch.nn.Module, settings: Settings, report: AccelReport, role: str = "transformer"
) -> str:
    """``PRECISION=fp8``: FP8 self-attention and float8 block linears (``fp8.py``); the precision
    this transformer runs in. Where FP8 can't run (no Hopper GPU, no FA3 wheel, no torchao) it
    stays bf16, logs one warning per report, and ``report.precision`` says why."""
    precision = report.precision
    if settings.precision != "fp8":
        if precision is None or precision.requested != settings.precision:
            report.precision = PrecisionReport(settings.precision, settings.precision)
        return settings.precision
    from wan_worker.runtime import fp8

    if precision is None or precision.requested != "fp8":  # decided once per report
        reason = fp8.unavailable_reason()
        precision = report.precision = PrecisionReport("fp8", "bf16" if reason else "fp8", reason=reason)
        if reason:
            log.warning("PRECISION=fp8 is not available here; running bf16", extra={"reason": reason})
    if precision.applied != "fp8":
        return "bf16"
    started = time.perf_counter()
    if precision.modules is None:
        precision.modules = {}
    counts = precision.modules
    try:
        linears = fp8.quantize_block_linears(transformer)
        gelus = fp8.use_sigmoid_gelu(transformer)
        ffns = fp8.fuse_gelu_into_float8_ffns(transformer)
        attention = fp8.enable_fp8_attention(transformer, fp8.fa3_flash_attn_func())
    except Exception as exc:  # noqa: BLE001 - FP8 is an optimisation: fall back as far as possible
        fp8.disable_fp8_attention(transformer)
        reason = f"fp8 set-up failed for {role} ({type(transformer).__name__}): {type(exc).__name__}: {str(exc)[:200]}"
        # health tells the truth: float8 linears already set up stay (torchao can't undo them,
        # and a quantization can fail halfway), so "mixed" when there are any here or an
        # earlier transformer runs fp8; else bf16
        linears = fp8.float8_linear_count(transformer)
        earlier_fp8 = any("error" not in v for v in counts.values())
        precision.applied, precision.reason = ("mixed" if earlier_fp8 or linears else "bf16"), reason
        counts[role] = {"error": reason, **({"float8_linears": linears} if linears else {})}
        log.warning("PRECISION=fp8 set-up failed", extra={"reason": reason, "float8_linears": linears})
        return "mixed" if linears else "bf16"
    counts[role] = {
        "fp8_self_attention": attention,
        "float8_linears": linears,
        "sigmoid_gelu": gelus,
        "fused_gelu_ffns": ffns,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return "fp8"


def precision_status(report: AccelReport, settings: Settings) -> dict[str, Any]:
    """For health: what was requested, what runs (``None`` until a transformer has loaded), why."""
    if report.precision is None or report.precision.requested != settings.precision:
        return {"requested": settings.precision, "applied": None}
    return report.precision.as_dict()


# -- portable compile artifacts --------------------------------------------------------------------


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs and Triton kernels (``TORCHINDUCTOR_CACHE_DIR``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def compile_artifacts_path(settings: Settings) -> Path | None:
    """One file per torch version, GPU and precision (artifacts of another stack would miss)."""
    if not torch.cuda.is_available():
        return None
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    name = f"compile-artifacts-torch{torch.__version__}-{gpu}-{settings.precision}.bin"
    return Path(settings.compile_cache_dir) / name


def load_compile_artifacts(settings: Settings) -> dict[str, Any]:
    """Before anything compiles: feed the saved compile artifacts (``torch.compiler`` mega-cache:
    inductor, autotuning and AOT-autograd entries) back into this process's caches. Guarded:
    a missing, stale or unreadable file is logged and ignored; compile then runs as usual."""
    info: dict[str, Any] = {"loaded": False}
    path = compile_artifacts_path(settings)
    if path is None or (not settings.compile_transformer and not settings.compile_vae):
        return info
    info["path"] = str(path)
    if not path.is_file():
        info["reason"] = "no saved artifacts yet (first start)"
        return info
    started = time.perf_counter()
    try:
        loaded = torch.compiler.load_cache_artifacts(path.read_bytes())
        info.update(loaded=loaded is not None, bytes=path.stat().st_size)
    except Exception as exc:  # noqa: BLE001 - a cache is an optimisation
        info["reason"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("compile artifacts not loaded", extra={"path": str(path), "reason": info["reason"]})
    info["load_seconds"] = round(time.perf_counter() - started, 2)
    return info


def save_compile_artifacts(settings: Settings, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """After the warm-up compiled: write this process's compile artifacts to the volume, so the
    next worker on this volume starts with them (``load_compile_artifacts``). Guarded. Adds to
    ``info`` (what loading recorded) and returns it."""
    info = {} if info is None else info
    path = compile_artifacts_path(settings)
    if path is None:
        return info
    started = time.perf_counter()
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            info["saved"] = False
            return info
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(saved[0])
        tmp.replace(path)  # atomic: a worker starting meanwhile reads the old file or the new one
        info.update(saved=True, saved_bytes=len(saved[0]), path=str(path))
    except Exception as exc:  # noqa: BLE001 - a cache is an optimisation
        info.update(saved=False, save_error=f"{type(exc).__name__}: {str(exc)[:200]}")
        log.warning("compile artifacts not saved", extra={"path": str(path), "reason": info["save_error"]})
    info["save_seconds"] = round(time.perf_counter() - started, 2)
    return info


# -- the transformer -------------------------------------------------------------------------------


def _raise_recompile_limits() -> None:
    """One compiled graph per (function, shape); dynamo's default limit of 8 would stop
    compiling after a few job sizes and silently fall back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)


class EagerFallback:
    """Runs compiled callables, and their eager originals from the first compile failure on.

    ``torch.compile`` only compiles at the first call, so a missing C compiler for Triton (or
    an inductor bug) would surface inside a job or the warm-up. One instance is shared by
    the callables of one model: once a compiled call fails where the eager one succeeds,
    they all run eagerly, and ``errors`` (the report's ``compile_errors``) says why.
    Out-of-memory errors pass through to the degrade path.
    """

    def __init__(self, what: str, errors: dict[str, str] | None = None) -> None:
        self.what = what
        self.errors = {} if errors is None else errors
        self.eager = False

    def wrap(self, compiled, eager):
        def call(*args: Any, **kwargs: Any):
            if self.eager:
                return eager(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - compile is an optimisation: run eagerly
                # An error the eager call raises as well is not compile's: it propagates from
                # here, and compile stays on.
                out = eager(*args, **kwargs)
                self.eager = True
                reason = f"{type(exc).__name__}: {str(exc)[:300]}"
                self.errors[self.what] = reason
                log.warning("compile failed; running eagerly", extra={"what": self.what, "reason": reason})
                return out

        return call


def compile_blocks(
    transformer: torch.nn.Module,
    errors: dict[str, str] | None = None,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    """Compile the ``forward`` of every repeated block; one graph per block class and shape.

    ``mode`` or ``options`` (inductor settings) go to ``torch.compile``, which takes one or the other.

    Each block gets a ``patches.COMPILED_FORWARD`` hook. Returns the number of blocks wrapped.
    Idempotent. A compile failure leaves the blocks eager (``EagerFallback``) and is recorded
    in ``errors``.
    """
    _raise_recompile_limits()
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    fallback = EagerFallback(type(transformer).__name__, errors)

    def make(eager):
        return fallback.wrap(torch.compile(eager, fullgraph=True, dynamic=False, mode=mode, options=options), eager)

    return sum(
        patches.compile_forward(module, make) for module in transformer.modules() if type(module).__name__ in names
    )


def optimize_transformer(
    transformer: torch.nn.Module, settings: Settings, report: AccelReport, role: str = "transformer"
) -> TransformerAccel:
    """Apply the attention backend, precision, fused QKV and regional compile to a Wan
    transformer. The backend and precision are decided once per ``report``; compile errors go
    to it. ``role`` names the transformer in the report (the T2V and turbo ones share a class)."""
    info = TransformerAccel(type(transformer).__name__, role)
    info.attention_backend = _set_backend(transformer, resolve_attention_backend(settings, report), report)
    info.precision = apply_precision(transformer, settings, report, role)
    if settings.fuse_qkv:
        try:
            transformer.fuse_qkv_projections()
            info.fused_qkv = True
        except Exception as exc:  # noqa: BLE001
            info.fused_qkv = f"failed: {type(exc).__name__}: {exc}"[:200]
    if settings.compile_transformer and torch.cuda.is_available():
        options = None
        if info.precision != "bf16":  # fp8, or mixed: float8 linears either way
            from wan_worker.runtime import fp8

            options = fp8.INDUCTOR_OPTIONS
        info.compiled_blocks = compile_blocks(transformer, report.compile_errors, options=options)
    return info


def transformer_dummy_inputs(
    transformer: torch.nn.Module, height: int, width: int, frames: int, device, text_len: int = 512
) -> dict:
    cfg = transformer.config
    gen = torch.Generator(device=device).manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    inputs = {
        "hidden_states": noise(1, cfg.in_channels, *latent),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": noise(1, text_len, cfg.text_dim),
        "return_dict": False,
    }
    if hasattr(cfg, "vace_in_channels") and getattr(cfg, "vace_layers", None):
        inputs["control_hidden_states"] = noise(1, cfg.vace_in_channels, *latent)
        inputs["control_hidden_states_scale"] = torch.ones(len(cfg.vace_layers), device=device)
    return inputs


def warm_transformer(transformer: torch.nn.Module, height: int, width: int, frames: int) -> dict[str, Any]:
    """One forward at this shape, so compilation and kernel autotuning happen now; the record
    (class, shape, seconds) for the report's ``warmups``."""
    inputs = transformer_dummy_inputs(transformer, height, width, frames, next(transformer.parameters()).device)
    return _timed_warmup(transformer, [frames, height, width], lambda: transformer(**inputs))


def _timed_warmup(module: torch.nn.Module, shape: list[int], run) -> dict[str, Any]:
    """Run ``run()`` once without grad and wait for the GPU; what ran and how long."""
    started = time.perf_counter()
    with torch.inference_mode():
        run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"class": type(module).__name__, "shape": shape, "seconds": round(seconds, 2)}


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


# -- the VAE ---------------------------------------------------------------------------------------


def vae_channels_last(vae: torch.nn.Module) -> int:
    """Store every 3-D convolution's weight channels-last (NDHWC), so cuDNN runs its NDHWC
    kernels without transposing the activations around each call. Returns the count."""
    count = 0
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)
            count += 1
    return count


def _rms_norm_silu(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(WanRMS_norm(x))`` in one pass, in fp32, rounded once at the end."""
    dim = 1 if norm.channel_first else -1
    y = torch.nn.functional.normalize(x.float(), dim=dim) * norm.scale * norm.gamma + norm.bias
    return torch.nn.functional.silu(y).to(x.dtype)


def compile_vae_norms(vae: torch.nn.Module, errors: dict[str, str] | None = None) -> int:
    """Fuse each decoder ``WanRMS_norm`` that feeds a SiLU into one compiled kernel.

    Profiling the bf16 decode at 480x832x81 shows convolutions take only about a third of its
    GPU time; the rest is element-wise passes over full-resolution activations, and each
    norm + SiLU is about eight of them in eager mode (upcast, norm reduction, divide,
    downcast, scale, gamma, bias, SiLU). The residual blocks and the decoder head always
    apply their SiLU right after the norm, so the norm computes both and the module's
    activation passes its input through (``patches.fuse_norm_silu``: two named diffusers
    hooks). The norm module itself is the compiled function's first
    argument: its channel count stays a compile-time constant, which gives inductor's
    persistent (single-pass) reduction, 4x faster here than the looped one that a
    tensor-only signature with a dynamic channel count gets.

    Only the decoder: the encoder (image-to-image and VACE references, a few frames) stays
    eager, so no job compiles inside its time bound. If compiling fails, the same function
    runs eagerly (``EagerFallback``, recorded in ``errors``). Returns the number of norms fused.
    """
    _raise_recompile_limits()
    compiled = torch.compile(_rms_norm_silu, dynamic=True, fullgraph=True)
    fused = EagerFallback("vae_norms", errors).wrap(compiled, _rms_norm_silu)
    count = 0
    for module in getattr(vae, "decoder", vae).modules():
        if not isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU):
            continue
        names = ("norm1", "norm2") if type(module).__name__ == "WanResidualBlock" else ("norm_out",)
        norms = [getattr(module, n, None) for n in names]
        if not all(type(n).__name__ == "WanRMS_norm" for n in norms):
            continue
        count += sum(patches.fuse_norm_silu(norm, module.nonlinearity, fused) for norm in norms)
    return count


def optimize_vae(vae: torch.nn.Module, settings: Settings, errors: dict[str, str] | None = None) -> VaeAccel:
    """cuDNN autotuning and channels-last weights for the VAE's 3-D convolutions, and fused
    norm + SiLU kernels (compile errors recorded in ``errors``)."""
    info = VaeAccel()
    if not torch.cuda.is_available():
        return info
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        info.cudnn_benchmark = True
    if settings.vae_channels_last:
        info.channels_last_convs = vae_channels_last(vae)
    if settings.compile_vae:
        info.fused_norms = compile_vae_norms(vae, errors)
    return info


def warm_vae(vae: torch.nn.Module, height: int, width: int) -> dict[str, Any]:
    """Decode two latent frames at this size, so the compiled norms exist before the first job."""
    device = next(vae.parameters()).device
    latents = torch.zeros(1, vae.config.z_dim, 2, height // 8, width // 8, device=device, dtype=vae.dtype)
    return _timed_warmup(vae, [5, height, width], lambda: vae.decode(latents, return_dict=False))


# -- Qwen --------------------------------------------------------------------------------------------


def prepare_qwen(model: torch.nn.Module, settings: Settings, generate_kwargs: dict[str, Any]) -> QwenAccel:
    """Static KV cache + transformers' own decode compile (CUDA graphs), warmed once here.

    Called once the model is on its device. Only the one-token decode step is compiled
    (prefill stays eager, since prompt lengths vary); the cache is sized for
    ``ENHANCE_MAX_CACHE_LEN`` tokens so every prompt up to that reuses one graph. Decoding
    also uses the deferred stop check (``patches.defer_stop_check_on_cuda``). The warm-up calls ``generate`` with the enhancer's
    own ``generate_kwargs``, less its stop criterion. If the warm-up fails,
    compile is switched off for this model and decoding stays eager.
    """
    info = QwenAccel()
    device = next(model.parameters()).device
    if not settings.enhance_compile or device.type != "cuda":
        return info
    from transformers import CompileConfig

    info.deferred_stop_check = patches.defer_stop_check_on_cuda()
    # all 16 tokens, so the graph is recorded: a stop string in random text would end it early
    warm_kwargs = {k: v for k, v in generate_kwargs.items() if k not in ("stopping_criteria", "stop_strings")}
    gc = model.generation_config
    gc.cache_implementation = "static"
    gc.max_cache_len = settings.enhance_max_cache_len
    gc.compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            # compile, record the CUDA graph, then a second prompt length
            for length in (32, 32, 256):
                ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=16,
                    min_new_tokens=16,
                    **warm_kwargs,
                )
        torch.cuda.synchronize()
        info.compile, info.warmup_seconds = True, round(time.perf_counter() - started, 2)
    except Exception as exc:  # noqa: BLE001 - compile is an optimisation; eager decoding still works
        gc.cache_implementation = None
        gc.compile_config = None
        gc.max_cache_len = None
        gc.disable_compile = True
        info.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("Qwen decode compile failed; decoding eagerly", extra={"reason": info.error})
    return info
