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
    same volume); ``--cold-restarts`` picks the restarts. Page cache dropped before each, where
    the OS allows."""
    env = ctx.child_env(ctx.settings(precision=ctx.args.precision))
    env["WARMUP_ON_START"] = "1"
    cache, artifacts = ctx.work / "inductor-cache-cold", ctx.work / "compile-artifacts-cold"
    for folder in (cache, artifacts):
        shutil.rmtree(folder, ignore_errors=True)
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache), COMPILE_CACHE_DIR=str(artifacts))
    first = _cold_child(ctx, env, "first_start")
    out = dict(first)
    restarts = [x for x in ctx.args.cold_restarts.split(",") if x]
    if ctx.tiny or "error" in first:
        return out
    if "caches" in restarts:
        out["restart_with_caches"] = _cold_child(ctx, env, "restart_with_caches")
    startup_list = (first.get("startup_files") or {}).get("path")
    if "without_startup_files" in restarts and startup_list and Path(startup_list).is_file():
        aside = Path(f"{startup_list}.aside")
        Path(startup_list).rename(aside)
        try:
            out["restart_without_startup_files"] = _cold_child(ctx, env, "restart_without_startup_files")
        finally:
            aside.rename(startup_list)
    if "artifacts_only" in restarts:
        empty = ctx.work / "inductor-cache-empty"
        shutil.rmtree(empty, ignore_errors=True)
        artifacts_only = {**env, "TORCHINDUCTOR_CACHE_DIR": str(empty)}
        out["restart_with_artifacts_only"] = _cold_child(ctx, artifacts_only, "restart_with_artifacts_only")
    return out


def _cold_child(ctx: Context, env: dict[str, str], name: str) -> dict[str, Any]:
    dropped = drop_page_cache()
    shape = ["--height", str(ctx.height), "--width", str(ctx.width), "--frames", str(ctx.frames)]
    started = now()
    out = ctx.run_child("cold_start", shape, env, timeout=900)
    if "error" not in out:
        out.update(page_cache_dropped=dropped, wall_s_from_parent=r(now() - started, 2))
    # each start as it finishes: a run cut short still shows the starts it made
    print(f"[cold_start] {name}: ready {out.get('ready_s', out.get('error'))} s", file=sys.stderr, flush=True)
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
    try:  # handler.py imports the SDK here; a machine without it measures the rest and says so
        import runpod  # noqa: F401

        marks["sdk_imported"] = True
    except ImportError:
        marks["sdk_imported"] = False
    marks["sdk_import_s"] = since()
    before_worker = set(sys.modules)
    import torch

    from wan_worker.serving import worker as worker_module

    marks["imports_s"] = since()
    startup_modules = set(sys.modules) - before_worker
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
