"""Non-generation actions, as serverless job inputs.

``{"action": "health"}``, ``{"action": "debug_env"}``, ``{"action": "enhance", ...}`` and
``{"action": "list_loras"}``.
``debug_env`` reports only *whether* each expected variable is set, never a value.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wan_worker.contract.settings import SECRET_ENV_VARS, Settings, env_presence
from wan_worker.runtime.accel import precision_status

if TYPE_CHECKING:
    from wan_worker.contract.schema import JobInput
    from wan_worker.runtime.loras import LoraRuntime
    from wan_worker.runtime.models import ModelManager
    from wan_worker.runtime.readiness import Readiness
    from wan_worker.stages.enhance import Enhancer

EXPECTED_ENV_VARS = (
    "MODEL_PROFILE",
    "MODELS_DIR",
    "QWEN_MODEL",
    "BUCKET_ENDPOINT_URL",
    "BUCKET_NAME",
    "CALLBACK_URL",
    "CALLBACK_ALLOWED_HOSTS",
    "GPU_MEMORY_BUDGET_GB",
    "JOB_TIMEOUT_S",
    "LORA_DIR",
    *SECRET_ENV_VARS,
)


@dataclass(frozen=True)
class ActionContext:
    """What the actions read: the worker's parts and counters, never the worker itself."""

    settings: Settings
    manager: ModelManager
    enhancer: Enhancer
    loras: LoraRuntime
    readiness: Readiness
    started_at: float
    jobs_done: int
    gpu: threading.Lock  # the enhance action runs Qwen on the GPU, taking turns with jobs


def run(ctx: ActionContext, inp: JobInput) -> dict[str, Any]:
    actions = {"health": health, "debug_env": debug_env, "enhance": enhance, "list_loras": list_loras}
    return actions[inp.action](ctx, inp)


def health(ctx: ActionContext, inp: JobInput) -> dict[str, Any]:
    memory = ctx.manager.memory_report()
    reasons = ctx.readiness.reasons()
    return {
        "status": "unhealthy" if reasons else "healthy",
        "worker": "wan",
        "qwen_loaded": ctx.manager.qwen_loaded,
        "wan_loaded": ctx.manager.wan_loaded,
        "worker_ready": not reasons,
        "reason": "; ".join(reasons) or None,
        "timestamp": time.time(),
        "uptime_seconds": round(time.time() - ctx.started_at, 1),
        "jobs_done": ctx.jobs_done,
        "model_profile": ctx.settings.model_profile,
        "enhancement_cache_hits": ctx.enhancer.cache_hits,
        "gpu_memory_used_gib": memory.get("gpu_allocated_gib"),
        "gpu_memory_free_gib": memory.get("gpu_free_gib"),
        "memory": memory,
        "precision": precision_status(ctx.manager.accel, ctx.settings),
    }


def debug_env(ctx: ActionContext, inp: JobInput) -> dict[str, Any]:
    return {
        "worker": "wan",
        "env_set": env_presence(EXPECTED_ENV_VARS),
        "bucket_configured": ctx.settings.bucket_configured,
        "callback_configured": bool(ctx.settings.callback_url and ctx.settings.callback_secret),
    }


def enhance(ctx: ActionContext, inp: JobInput) -> dict[str, Any]:
    job_type = inp.job_type
    quality = inp.quality or "fast"
    with ctx.gpu:
        result = ctx.enhancer.enhance(inp.prompt or "", job_type, quality)
    response = {
        "success": result.enhancement_applied,
        "enhanced_prompt": result.enhanced_prompt,
        "original_prompt": result.original_prompt,
        "enhancement_source": result.enhancement_source,
        "processing_time": round(result.enhancement_time, 3),
        "model": inp.model,
        "model_path": result.model,
        "enhancement_applied": result.enhancement_applied,
        "model_was_loaded": result.model_was_loaded,
        "cache_hit": result.cache_hit,
        "worker": "wan",
    }
    if result.reason:
        response["reason"] = result.reason
    return response


def list_loras(ctx: ActionContext, inp: JobInput) -> dict[str, Any]:
    """The LoRA files in ``LORA_DIR``, described from their headers (nothing is loaded)."""
    return {**ctx.loras.describe_all(), "worker": "wan"}
