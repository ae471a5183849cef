"""Section ``cold_start`` (``coldstart``): a fresh worker process until ready, phase by phase."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .context import Context
from .harness import drop_page_cache, gpu_peak_gib, now, r

#: Libraries the worker needs only on some paths; importing them at start costs cold start.
HEAVY_MODULES = ("torchao", "fa3_fwd_interface", "torch._inductor", "imageio_ffmpeg", "boto3", "runpod")


def cold_start(ctx: Context) -> dict[str, Any]:
    """A first start (empty compile caches, no startup file list); a restart with everything the
    first start left (inductor's directory, the portable compile artifacts and the startup file
    list, as on a network volume); the same restart without the startup file list; and a restart
    with the artifacts file and the list but an empty inductor directory (a new machine on the
    same volume). Page cache dropped before each, where the OS allows."""
    env = ctx.child_env(ctx.settings(precision=ctx.args.precision))
    env["WARMUP_ON_START"] = "1"
    cache, artifacts = ctx.work / "inductor-cache-cold", ctx.work / "compile-artifacts-cold"
    for folder in (cache, artifacts):
        shutil.rmtree(folder, ignore_errors=True)
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache), COMPILE_CACHE_DIR=str(artifacts))
    first = _cold_child(ctx, env)
    out = dict(first)
    if not ctx.tiny and "error" not in first:
        out["restart_with_caches"] = _cold_child(ctx, env)
        startup_list = (first.get("startup_files") or {}).get("path")
        if startup_list and Path(startup_list).is_file():
            aside = Path(f"{startup_list}.aside")
            Path(startup_list).rename(aside)
            out["restart_without_startup_files"] = _cold_child(ctx, env)
            aside.rename(startup_list)
        empty = ctx.work / "inductor-cache-empty"
        shutil.rmtree(empty, ignore_errors=True)
        out["restart_with_artifacts_only"] = _cold_child(ctx, {**env, "TORCHINDUCTOR_CACHE_DIR": str(empty)})
    return out


def _cold_child(ctx: Context, env: dict[str, str]) -> dict[str, Any]:
    dropped = drop_page_cache()
    shape = ["--height", str(ctx.height), "--width", str(ctx.width), "--frames", str(ctx.frames)]
    started = now()
    out = ctx.run_child("cold_start", shape, env, timeout=900)
    if "error" not in out:
        out.update(page_cache_dropped=dropped, wall_s_from_parent=r(now() - started, 2))
    return out


def child_cold_start(args: argparse.Namespace) -> dict[str, Any]:
    """The child: interpreter start to ready, with the time of each phase, in handler.py's order
    (the startup file prefetch first, then the imports, then ``serverless_config``'s warm-up)."""
    import psutil

    t_proc = psutil.Process().create_time()

    def since() -> float:
        return round(time.time() - t_proc, 2)

    marks: dict[str, Any] = {"interpreter_start_to_main_s": since()}
    from wan_worker.contract.settings import get_settings
    from wan_worker.infra import pagecache

    pagecache.prefetch_startup_files(get_settings().compile_cache_dir)
    marks["prefetch_started_s"] = since()
    import torch

    from wan_worker.serving import worker as worker_module

    marks["imports_s"] = since()
    startup_modules = set(sys.modules)
    # what the first load imports anyway (the packages' lazy stubs import nothing)
    import diffusers.pipelines.wan.pipeline_wan  # noqa: F401
    import transformers.models.umt5.modeling_umt5  # noqa: F401

    marks["diffusers_transformers_imported_s"] = since()
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
    marks["cuda_initialised_s"] = since()
    w = worker_module.get_worker()
    marks["worker_built_s"] = since()
    # what WARMUP_ON_START runs: compile artifacts in, transformer and VAE loaded and warmed up
    # while the weights are read ahead, UMT5 loaded, artifacts and the startup file list out
    w.manager.warm_up(args.width, args.height, args.frames)
    marks["ready_s"] = since()
    marks["load_seconds"] = {k: round(v, 2) for k, v in w.manager.load_seconds.items()}
    report = w.manager.accel.as_dict()
    for key in ("warmups", "compile_artifacts", "compile_errors", "precision", "attention_backend"):
        marks[key] = report.get(key)
    marks["checkpoint_read_ahead"] = report.get("checkpoint_read_ahead")
    marks["startup_files"] = report.get("startup_files")
    marks["compile_enabled"] = w.settings.compile_transformer
    marks["heavy_modules_at_import"] = sorted(m for m in HEAVY_MODULES if m in startup_modules)
    marks["peak_gib"] = gpu_peak_gib()
    return marks
