"""``python -m benchmarks``: the arguments, the sections in order, and the JSON document."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import benchmarks

from . import coldstart, cpu_stages, long, lora, pipeline, precision, qwen, residency, throughput, turbo, vae
from .checkpoints import write_models
from .context import Context
from .harness import FULL_MODELS, free_cuda, now, r, versions
from .summary import summary
from .transformer import attention, scaling, transformer

Section = Callable[[Context], dict[str, Any]]


def s3_server(ctx: Context) -> dict[str, Any]:
    """A local SeaweedFS for the upload stage (``--s3 weed``); assets go inline without one."""
    from wan_worker.infra.local_s3 import find_weed, start_s3

    weed = os.environ.get("WEED_BIN") or find_weed()
    if not weed:
        return {"available": False, "substitute": "inline base64 (no S3 server binary found)"}
    started = now()
    ctx.s3 = start_s3(ctx.work / "seaweedfs", weed=weed)
    return {"available": True, "binary": weed, "startup_s": r(now() - started, 2), "endpoint": ctx.s3.endpoint}


#: Every section in the order a full run takes them.
SECTIONS: dict[str, Section] = {
    "write_models": write_models,
    "s3_server": s3_server,
    "cold_start": coldstart.cold_start,
    "attention": attention,
    "transformer": transformer,
    "vae": vae.vae,
    "reference": pipeline.reference,
    "worker": pipeline.worker_runs,
    "cpu_stages": cpu_stages.cpu_stages,
    "qwen": qwen.qwen,
    "residency": residency.residency,
    "scaling": scaling,
    "turbo": turbo.turbo,
    "throughput": throughput.throughput,
    "turbo_residency": residency.turbo_residency,
    "lora": lora.lora,
    "long": long.long,
    "fp8": precision.fp8,
}
#: More workers and jobs: a plain ``--tiny`` (CI) leaves them out; ``--sections`` runs them.
NOT_IN_PLAIN_TINY = ("fp8", "turbo", "throughput", "turbo_residency", "lora", "long")
#: ``--child``: what a fresh process started by a section runs (fresh CUDA context).
CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cold_start": coldstart.child_cold_start,
    "residency": residency.child_residency,
    "turbo_residency": residency.child_turbo_residency,
    "precision_run": precision.child_precision_run,
}


def run_section(ctx: Context, name: str, fn: Section) -> None:
    """One section; its failure is recorded in its place and the run goes on."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    started = now()
    try:
        value = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(value, dict):
        value.setdefault("section_seconds", r(now() - started, 1))
    ctx.sections[name] = value
    print(f"[bench] {name} done in {now() - started:.1f}s", file=sys.stderr, flush=True)
    ctx.save()
    free_cuda()


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from wan_worker.runtime.stack import describe

    args = ctx.args
    ctx.result["versions"] = versions()
    ctx.save()
    print(f"[bench] {describe(ctx.result['versions']['stack'])}", file=sys.stderr, flush=True)
    if not ctx.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke test")
    order = list(SECTIONS)
    if args.s3 != "weed":
        order.remove("s3_server")
    if ctx.tiny and not args.sections:
        order = [n for n in order if n not in NOT_IN_PLAIN_TINY]
    if args.sections:  # the caller's order, so the most wanted numbers come first
        order = [n for n in args.section_order if n in order]
    for name in order:
        run_section(ctx, name, SECTIONS[name])
    if ctx.s3 is not None:
        ctx.s3.stop()
    ctx.result["summary"] = summary(ctx.result)
    ctx.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    ctx.save()
    print(f"[bench] {describe(ctx.result['versions']['stack'])}", file=sys.stderr, flush=True)
    return ctx.result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0])
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
    p.add_argument(
        "--cold-restarts",
        default="caches,without_startup_files,artifacts_only",
        help="cold_start: the restarts to run after the first start (comma list; empty: none)",
    )
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
    p.add_argument(
        "--throughput-jobs",
        type=int,
        default=3,
        help="throughput: back-to-back jobs per job type",
    )
    p.add_argument(
        "--precision-jobs", type=int, default=3, help="fp8: benchmark jobs per precision (the median; 1 with --tiny)"
    )
    p.add_argument("--lora-rank", type=int, default=32, help="lora: rank of the two benchmark LoRAs")
    p.add_argument("--lora-steps", type=int, default=10, help="lora: denoising steps of its video_fast jobs")
    p.add_argument(
        "--long-steps", type=int, default=8, help="long: steps of the fast-quality segments (turbo runs its 3)"
    )
    p.add_argument("--long-durations", default="15,60", help="long: durations in seconds (--tiny: 2,3)")
    p.add_argument("--long-qualities", default="fast,turbo", help="long: qualities to run (comma list)")
    p.add_argument(
        "--child",
        choices=list(CHILDREN),
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
        print(json.dumps(CHILDREN[args.child](args), default=str), flush=True)
        return 0
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(Context(args))
    print(json.dumps(result.get("summary", {}), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
