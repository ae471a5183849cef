"""One RunPod job end to end, and the mapping of every failure to a clear error.

validate -> fetch references -> load -> enhance -> encode prompt -> denoise -> decode
-> encode media -> upload -> result (+ optional signed callback, + one metrics log line)
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import actions, callback, logs
from . import presets as P
from .enhance import Enhancer
from .errors import ErrorCode, GenerationFailed, JobTimeout, ReferenceUnavailable, WorkerError
from .generate import Conditioning, Generated, Generator, build_conditioning, model_pipeline
from .jobs import Job, build_job
from .long_video import LongVideo
from .media import EncodedMedia, encode
from .models import ModelManager
from .progress import Progress, Sender, runpod_sender
from .readiness import Readiness
from .references import RESIZE_POLICY, ReferenceFetchError, load_reference, prepare
from .schema import Asset, AssetMetadata, JobResult, parse_job_input
from .segments import CostModel
from .settings import Settings, get_settings
from .storage import Storage, StoredObject

log = logging.getLogger("wan_worker")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Worker:
    """Process-wide state: resident models, the enhancement cache, the storage client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = ModelManager(settings)
        self.generator = Generator(self.manager, settings)
        self.enhancer = Enhancer(self.manager, settings)
        self.storage = Storage(settings)
        self.readiness = Readiness(settings)
        self.costs = CostModel(self.manager.device.type, settings.model_profile)
        self.long_video = LongVideo(self)
        self.started_at = time.time()
        self.jobs_done = 0

    # -- entry point --------------------------------------------------------------------------

    def handle(self, job: dict[str, Any], send: Sender | None = None) -> dict[str, Any]:
        runpod_id = str(job.get("id") or "local")
        token = logs.job_id_var.set(runpod_id)
        try:
            return self._handle(job, runpod_id, send)
        finally:
            logs.job_id_var.reset(token)
            self.jobs_done += 1

    def _handle(self, job: dict[str, Any], runpod_id: str, send: Sender | None) -> dict[str, Any]:
        started = time.perf_counter()
        progress = Progress(send or runpod_sender(job, self.settings))
        metrics: dict[str, Any] = {}
        job_obj: Job | None = None
        try:
            progress.enter("validating")
            inp = parse_job_input(job.get("input"))
            if inp.action != "generate":
                return actions.run(self, inp)
            job_obj = build_job(
                inp, job_id=safe_job_id(inp.id or runpod_id), default_quality=self.settings.default_quality
            )
            output = self._generate(job_obj, runpod_id, progress, started, metrics)
        except WorkerError as exc:
            output = exc.to_output()
        except Exception as exc:
            log.exception("unexpected failure")
            if cuda_error(exc):  # the CUDA context may be broken: fail retryable and restart the worker
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                output = WorkerError(
                    f"CUDA error ({first_line}); the job was not completed and this worker restarts",
                    code=ErrorCode.CUDA_ERROR,
                    retryable=True,
                    refresh_worker=True,
                ).to_output()
            else:
                output = WorkerError(f"internal error ({type(exc).__name__}); the job was not completed").to_output()
        if job_obj is not None:
            output["job_id"] = job_obj.job_id
            self._finish(job_obj, output, metrics, time.perf_counter() - started)
        else:
            self._reject(job, runpod_id, output)
        return output

    # -- the generation path ------------------------------------------------------------------

    def _generate(self, job: Job, runpod_id: str, progress: Progress, started: float, metrics: dict) -> dict[str, Any]:
        s = self.settings
        self.readiness.check_work_dir()
        deadline = time.monotonic() + s.job_timeout_s
        timings: dict[str, float] = {"validating": time.perf_counter() - started}
        if self.long_video.applies(job):
            return self.long_video.run(job, runpod_id, progress, started, metrics, deadline, timings)
        warnings: list[str] = [*job.adjustments]
        if job.ignored_overrides:
            warnings.append("ignored overrides: " + ", ".join(job.ignored_overrides))
        if job.ignored_fields:
            warnings.append("ignored fields: " + ", ".join(job.ignored_fields))

        t = time.perf_counter()
        loras_applied = self.generator.loras.prepare(job)  # may set steps/guidance/shift from a sidecar
        if job.loras:
            timings["lora_loading"] = time.perf_counter() - t

        mode, images = self._references(job, progress, timings, warnings, deadline)
        cond = build_conditioning(job, mode, images)

        pipeline_name = model_pipeline(job, cond)
        if not self.manager.ready(pipeline_name):
            progress.enter("loading")
            t = time.perf_counter()
            with self.readiness.loading(self.manager):
                self.manager.pipeline(pipeline_name)
            timings["loading"] = time.perf_counter() - t

        prompt = job.prompt
        enhancement = None
        if job.enhance_prompt:
            progress.enter("enhancing")
            enhancement = self.enhancer.enhance(job.prompt, job.job_type, job.quality)
            timings["enhancing"] = enhancement.enhancement_time
            prompt = enhancement.enhanced_prompt
            if not enhancement.enhancement_applied:
                warnings.append(f"prompt enhancement not applied ({enhancement.reason}); the original prompt was used")
        _check_deadline(deadline, s, "before generation")

        progress.enter("generating", step=0, total_steps=job.steps, reference_mode=mode)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        generated, run_job, degraded = self._generate_degrading(job, prompt, cond, progress, deadline, warnings)
        timings.update(generated.timings)
        forwards = generated.steps_run * (2 if run_job.guidance_scale > 1.0 else 1)
        self.costs.record(cond.pipeline, job.width, job.height, job.num_frames, forwards, generated.timings)
        peak_vram = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None

        with tempfile.TemporaryDirectory(prefix=f"wan-{job.job_id}-", dir=s.work_dir) as tmp:
            progress.enter("encoding")
            t = time.perf_counter()
            try:
                media = encode(generated.frames, Path(tmp), as_video=job.kind == "video", fps=job.fps)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise WorkerError(
                    f"disk full: no space left in WORK_DIR ({s.work_dir or tempfile.gettempdir()}) while writing "
                    f"the {job.kind}; the job was not completed",
                    code=ErrorCode.DISK_FULL,
                    retryable=True,
                ) from None
            timings["encoding"] = time.perf_counter() - t
            _check_deadline(deadline, s, "before upload")

            progress.enter("uploading")
            t = time.perf_counter()
            stored, thumb = self.store(job, runpod_id, media, warnings)
            timings["uploading"] = time.perf_counter() - t
            file_size = media.path.stat().st_size

        timings["total"] = time.perf_counter() - started
        asset = Asset(
            type=job.kind,
            url=stored.url,
            thumbnail_url=thumb.url,
            path=stored.path,
            thumbnail_path=thumb.path,
            metadata=AssetMetadata(
                width=media.width,
                height=media.height,
                frames=media.frames,
                fps=media.fps,
                duration_seconds=media.duration_seconds,
                file_size_bytes=file_size,
                format=media.format,  # type: ignore[arg-type]
                seed=job.seed,
                pipeline=cond.pipeline,  # type: ignore[arg-type]
                reference_mode_requested=job.reference_mode_requested,
                reference_mode_applied=mode,  # type: ignore[arg-type]
                denoise_strength=cond.denoise_strength,
                conditioning_scale=cond.conditioning_scale,
                resize_policy=RESIZE_POLICY if images else None,
                conditioning=cond.summary(),
                loras_applied=loras_applied,
            ),
        )
        metadata: dict[str, Any] = {
            "job_type": job.job_type,
            "quality": run_job.quality,
            "steps": generated.steps_run,
            "scheduler_steps": run_job.steps,
            "guidance_scale": run_job.guidance_scale,
            "flow_shift": job.flow_shift,
            "sampler": run_job.sampler,
            "timesteps": generated.timesteps,
            "model": self.manager.model_id(pipeline_name),
            "sampling_sources": run_job.sampling_sources,
            "seed": job.seed,
            "seed_source": job.seed_source,
            "negative_prompt": job.negative_prompt,
            "prompt": prompt,
            "step_cache": {"mode": job.step_cache, "threshold": generated.step_cache_threshold},
            "denoise_source": job.denoise_source,
            "quality_degraded": degraded,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "total_seconds": round(timings["total"], 3),
            "peak_vram_gib": round(peak_vram, 2) if peak_vram is not None else None,
            "worker": "wan",
        }
        if job.enhance_prompt and enhancement is not None:
            metadata.update(
                original_prompt=enhancement.original_prompt,
                enhanced_prompt=enhancement.enhanced_prompt if enhancement.enhancement_applied else None,
                enhancement_applied=enhancement.enhancement_applied,
                enhancement_source=enhancement.enhancement_source,
                enhancement_time=round(enhancement.enhancement_time, 3),
                enhancement_cache_hit=enhancement.cache_hit,
                enhancement_reason=enhancement.reason,
            )
        else:
            metadata["enhancement_applied"] = False
        metrics.update(
            quality=run_job.quality,
            reference_mode=mode,
            timings=metadata["timings"],
            peak_vram_gib=metadata["peak_vram_gib"],
            enhancement_applied=metadata["enhancement_applied"],
            asset=asset.metadata.model_dump(),
        )
        result = JobResult(job_id=job.job_id, assets=[asset], metadata=metadata, warnings=warnings)
        self.readiness.served()
        return result.model_dump()

    def store(self, job: Job, runpod_id: str, media: EncodedMedia, warnings: list[str]) -> list[StoredObject]:
        """Upload the asset and its thumbnail under this RunPod job's key prefix."""
        names = [media.path.name, media.thumbnail_path.name]
        prefix, conflict = self.storage.job_prefix(job.user_id, job.job_id, runpod_id, names)
        if conflict:
            warnings.append(conflict)
        return self.storage.store(
            [
                (media.path, f"{prefix}/{names[0]}", media.content_type),
                (media.thumbnail_path, f"{prefix}/{names[1]}", "image/webp"),
            ],
            owner=runpod_id,
        )

    def _generate_degrading(
        self, job: Job, prompt: str, cond: Conditioning, progress: Progress, deadline: float, warnings: list[str]
    ) -> tuple[Generated, Job, dict | None]:
        """Generate; on CUDA out-of-memory free memory and retry once at the next lower quality
        (seed: "Quality Degradation"), then fail retryable and ask for a fresh worker."""
        try:
            return self.generator.generate(job, prompt, cond, progress, deadline), job, None
        except torch.OutOfMemoryError:
            self.manager.free_memory()
        lower = P.QUALITY_DEGRADE.get(job.quality, job.quality)
        degraded = {"from": job.quality, "to": lower, "reason": "CUDA out of memory"}
        warnings.append(f"out of GPU memory at quality '{job.quality}'; retried once at '{lower}'")
        log.warning("out of memory, degrading quality", extra=degraded)
        run_job = job.with_quality(lower)  # type: ignore[arg-type]
        try:
            return self.generator.generate(run_job, prompt, cond, progress, deadline), run_job, degraded
        except torch.OutOfMemoryError:
            self.manager.free_memory()
            raise GenerationFailed(
                f"out of GPU memory, also after retrying at quality '{lower}'",
                code=ErrorCode.OUT_OF_MEMORY,
                retryable=True,
                refresh_worker=True,
            ) from None

    def _references(
        self, job: Job, progress: Progress, timings: dict, warnings: list[str], deadline: float
    ) -> tuple[str, dict]:
        """Fetch and prepare the job's references; fall back to text-to-video (or -image), visibly."""
        if not job.references:
            return "none", {}
        progress.enter("fetching_references")
        t = time.perf_counter()
        images = {}
        try:
            for role, source in job.references.items():
                try:
                    images[role] = prepare(load_reference(source.value, self.settings, deadline), job.width, job.height)
                except ReferenceFetchError as exc:
                    reason = f"{source.field}: {exc}"
                    if job.strict_references:
                        raise ReferenceUnavailable(f"reference image unusable: {reason}", field=source.field) from None
                    warnings.append(
                        f"reference image unusable ({reason}); fell back to text-to-{job.kind} "
                        "(reference_mode_applied: none)"
                    )
                    log.warning("reference fallback", extra={"reason": reason})
                    return "none", {}
        finally:
            timings["fetching_references"] = time.perf_counter() - t
        return job.reference_mode_requested, images

    # -- after the job ------------------------------------------------------------------------

    def _finish(self, job: Job, output: dict[str, Any], metrics: dict, seconds: float) -> None:
        self._callback(job.job_id, job.callback_url, output, time.monotonic() - seconds + self.settings.job_timeout_s)
        self._log_metrics(job, output, metrics, seconds)

    def _callback(
        self, job_id: str, job_url: str | None, output: dict[str, Any], deadline: float | None = None
    ) -> None:
        s = self.settings
        url, warning = callback.resolve_url(s, job_url)
        if warning:
            output.setdefault("warnings", []).append(warning)
        if url and s.callback_secret:
            delivered = callback.deliver(
                url, s.callback_secret.get_secret_value(), callback.callback_body(job_id, output), s, deadline=deadline
            )
            output["callback_delivered"] = delivered

    def _reject(self, job: dict[str, Any], runpod_id: str, output: dict[str, Any]) -> None:
        """A job refused before it became a ``Job``: one metrics line, and the failure callback."""
        log.info(
            "job rejected", extra={"event": "job_metrics", "status": "failed", "error_code": output.get("error_code")}
        )
        raw = job.get("input") if isinstance(job.get("input"), dict) else {}
        if raw.get("action", "generate") != "generate":
            return
        raw_id, raw_url = raw.get("id"), raw.get("callback_url")
        output["job_id"] = safe_job_id(raw_id if isinstance(raw_id, str) and raw_id else runpod_id)
        self._callback(output["job_id"], raw_url if isinstance(raw_url, str) else None, output)

    def _log_metrics(self, job: Job, output: dict[str, Any], metrics: dict, seconds: float) -> None:
        asset = metrics.get("asset") or {}
        flags = []
        if seconds > self.settings.slow_generation_s:
            flags.append("slow_generation")
        if asset and asset.get("file_size_bytes", 0) < self.settings.small_file_bytes and job.kind == "video":
            flags.append("small_file")
        flags.extend(metrics.get("flags", []))  # long videos: seam_jump
        log.info(
            "job finished",
            extra={
                "event": "job_metrics",
                "worker": "wan",
                "job_type": job.job_type,
                "status": "failed" if "error" in output else "completed",
                "error_code": output.get("error_code"),
                "generation_time": round(seconds, 3),
                "timings": metrics.get("timings"),
                "video_duration": asset.get("duration_seconds"),
                "file_size": asset.get("file_size_bytes"),
                "resolution": f"{job.width}x{job.height}",
                "fps": job.fps if job.kind == "video" else None,
                "quality": metrics.get("quality", job.quality),
                "reference_mode": metrics.get("reference_mode", job.reference_mode_requested),
                "enhancement_applied": metrics.get("enhancement_applied", False),
                "peak_vram_gib": metrics.get("peak_vram_gib"),
                "prompt_sha256": hashlib.sha256(job.prompt.encode()).hexdigest()[:16],
                "prompt_chars": len(job.prompt),
                "flags": flags,
            },
        )


_CUDA_ERROR = re.compile(r"CUDA error|CUDA out of memory|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error")


def cuda_error(exc: BaseException) -> bool:
    """A device fault after which RunPod should restart the worker (``refresh_worker``)."""
    if isinstance(exc, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
        return True
    return isinstance(exc, RuntimeError) and bool(_CUDA_ERROR.search(str(exc)))


def safe_job_id(value: str) -> str:
    """Job ids become storage keys: anything but a plain id is replaced by its hash."""
    return value if _SAFE_ID.match(value) else "job-" + hashlib.sha256(value.encode()).hexdigest()[:24]


def _check_deadline(deadline: float, settings: Settings, where: str) -> None:
    if time.monotonic() > deadline:
        raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={settings.job_timeout_s:g}s {where}")


_worker: Worker | None = None


def get_worker() -> Worker:
    global _worker
    if _worker is None:
        settings = get_settings()
        logs.configure(settings.log_level, settings.secret_values(), settings.runpod_log_level)
        _worker = Worker(settings)
    return _worker


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod serverless handler."""
    return get_worker().handle(job)


#: runpod 1.12 runs a synchronous handler's jobs one after another even when it takes several
#: at once, so a second concurrent job would only wait (and its queue time would be hidden).
MAX_CONCURRENCY = 1


def concurrency_modifier(current: int) -> int:
    return min(get_settings().worker_concurrency, MAX_CONCURRENCY)


def serverless_config() -> dict[str, Any]:
    """The ``runpod.serverless.start`` config; loads models first when WARMUP_ON_START is set.

    A warm-up that fails for any reason but a CUDA fault is recorded, and the worker starts
    anyway (``Readiness``); after a CUDA fault the process exits so RunPod replaces it.
    """
    worker = get_worker()
    if worker.settings.worker_concurrency > MAX_CONCURRENCY:
        log.warning(
            f"WORKER_CONCURRENCY={worker.settings.worker_concurrency} capped at {MAX_CONCURRENCY}: the RunPod SDK "
            "runs this synchronous handler's jobs one after another"
        )
    if worker.settings.warmup_on_start:
        started = time.perf_counter()
        try:
            worker.manager.warm_up(P.DEFAULT_WIDTH, P.DEFAULT_HEIGHT, P.JOB_TYPES["video_fast"].frames)
        except Exception as exc:
            if cuda_error(exc) or (exc.__cause__ is not None and cuda_error(exc.__cause__)):
                log.critical("CUDA fault during warm-up; exiting so that RunPod replaces this worker", exc_info=True)
                raise SystemExit(1) from None
            worker.readiness.warm_up_failed(exc)
        else:
            log.info("worker warm", extra={"seconds": round(time.perf_counter() - started, 2)})
    worker.readiness.check_start()
    return {"handler": handler, "concurrency_modifier": concurrency_modifier}
