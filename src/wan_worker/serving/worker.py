"""One RunPod job end to end, and the mapping of every failure to a clear error.

``handler`` -> ``Worker.handle`` (job id in the logs) -> ``Worker.run`` (validate, or an action)
-> ``Worker.generate``: the numbered stages of ``flow.py``, each handing a typed value to the
next -> ``result.py`` builds the typed ``JobResult`` -> callback and one metrics log line. The
output becomes a dict only when ``handle`` returns it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Any

import torch

from wan_worker.contract import presets as P
from wan_worker.contract.errors import ErrorCode, WorkerError
from wan_worker.contract.jobs import Job, build_job
from wan_worker.contract.schema import JobFailure, JobOutput, parse_job_input
from wan_worker.contract.settings import Settings, get_settings
from wan_worker.infra import logs
from wan_worker.runtime.models import ModelManager
from wan_worker.runtime.readiness import Readiness
from wan_worker.serving import actions, flow, result
from wan_worker.serving.actions import ActionContext
from wan_worker.serving.long_video import LongVideo
from wan_worker.serving.result import Metrics, Outcome
from wan_worker.stages import callback
from wan_worker.stages.enhance import Enhancer
from wan_worker.stages.generate import Generator, build_conditioning, model_pipeline
from wan_worker.stages.observer import NO_OBSERVER, JobObserver
from wan_worker.stages.progress import Progress, Sender, runpod_sender
from wan_worker.stages.segments import CostModel
from wan_worker.stages.storage import Storage

log = logging.getLogger("wan_worker")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Worker:
    """Process-wide state: resident models, the enhancement cache, the storage client."""

    def __init__(self, settings: Settings, observer: JobObserver = NO_OBSERVER) -> None:
        self.settings = settings
        self.observer = observer
        manager = ModelManager(settings)
        self.runtime = flow.Runtime(
            settings=settings,
            manager=manager,
            generator=Generator(manager, settings),
            enhancer=Enhancer(manager, settings),
            storage=Storage(settings),
            readiness=Readiness(settings),
            costs=CostModel(manager.device.type, settings.model_profile),
        )
        self.long_video = LongVideo(self.runtime)
        self.started_at = time.time()
        self.jobs_done = 0

    @property
    def manager(self) -> ModelManager:
        return self.runtime.manager

    @property
    def generator(self) -> Generator:
        return self.runtime.generator

    @property
    def enhancer(self) -> Enhancer:
        return self.runtime.enhancer

    @property
    def readiness(self) -> Readiness:
        return self.runtime.readiness

    @property
    def storage(self) -> Storage:
        return self.runtime.storage

    # -- entry point --------------------------------------------------------------------------

    def handle(
        self, job: dict[str, Any], send: Sender | None = None, observer: JobObserver | None = None
    ) -> dict[str, Any]:
        runpod_id = str(job.get("id") or "local")
        token = logs.job_id_var.set(runpod_id)
        try:
            progress = Progress(send or runpod_sender(job, self.settings), observer=observer or self.observer)
            output = self.run(job, runpod_id, progress)
            return output if isinstance(output, dict) else output.model_dump()
        finally:
            logs.job_id_var.reset(token)
            self.jobs_done += 1

    def run(self, job: dict[str, Any], runpod_id: str, progress: Progress) -> JobOutput | dict[str, Any]:
        """Validate, then run an action or a generation; every failure becomes a ``JobFailure``."""
        started = time.perf_counter()
        job_obj: Job | None = None
        outcome: Outcome | None = None
        try:
            progress.enter("validating")
            inp = parse_job_input(job.get("input"))
            if inp.action != "generate":
                return actions.run(self.action_context(), inp)
            job_obj = build_job(
                inp, job_id=safe_job_id(inp.id or runpod_id), default_quality=self.settings.default_quality
            )
            outcome = self.generate(job_obj, runpod_id, progress, started)
            output: JobOutput = outcome.result
        except WorkerError as exc:
            output = JobFailure(**exc.to_output())
        except Exception as exc:
            log.exception("unexpected failure")
            output = JobFailure(**_unexpected(exc).to_output())
        if job_obj is None:
            self._reject(job, runpod_id, output)
            return output
        output.job_id = job_obj.job_id
        seconds = time.perf_counter() - started
        self._callback(
            job_obj.job_id, job_obj.callback_url, output, time.monotonic() - seconds + self.settings.job_timeout_s
        )
        self._log_metrics(job_obj, output, outcome.metrics if outcome else None, seconds)
        return output

    def action_context(self) -> ActionContext:
        rt = self.runtime
        return ActionContext(
            rt.settings,
            rt.manager,
            rt.enhancer,
            rt.generator.loras,
            rt.readiness,
            self.started_at,
            self.jobs_done,
            rt.gpu,
        )

    # -- the generation path ------------------------------------------------------------------

    def generate(self, job: Job, runpod_id: str, progress: Progress, started: float) -> Outcome:
        rt = self.runtime
        # 1. validate (done by ``build_job``): the job in flight, with its deadline
        run = flow.start(rt, job, runpod_id, progress, started)
        if self.long_video.applies(job):
            with flow.on_gpu(rt, run):
                return self.long_video.generate(run)
        with flow.work_dir(self.settings, job) as out_dir:
            with flow.on_gpu(rt, run):  # steps 2-5; another job's 6-8 run meanwhile
                # 2. plan: LoRAs (a sidecar may set steps/guidance/shift)
                t = time.perf_counter()
                loras_applied = rt.generator.loras.prepare(job)
                if job.loras:
                    run.timings["lora_loading"] = time.perf_counter() - t
                # 3. references, and the pipeline they select
                refs = flow.fetch_references(rt, run)
                cond = build_conditioning(job, refs.mode, refs.images)
                pipeline = model_pipeline(job, cond)
                flow.load(rt, run, [pipeline])
                # 4. enhance
                prompts = flow.enhance(rt, run, [job.prompt])
                # 5. generate (a video is encoded into out_dir while it is decoded)
                generation = flow.generate(rt, run, prompts.used[0], cond, refs, out_dir)
            # 6. encode
            media = flow.encode_media(rt, run, generation, out_dir)
            # 7. store
            stored = flow.store(rt, run, media)
        # 8. report
        outcome = result.single_pass(
            run, refs, prompts, generation, media, stored, rt.manager.model_id(pipeline), loras_applied
        )
        rt.readiness.served()
        return outcome

    # -- after the job ------------------------------------------------------------------------

    def _callback(self, job_id: str, job_url: str | None, output: JobOutput, deadline: float | None = None) -> None:
        s = self.settings
        url, warning = callback.resolve_url(s, job_url)
        if warning:
            output.warnings = [*(output.warnings or []), warning]
        if url and s.callback_secret:
            body = callback.callback_body(job_id, output.model_dump())
            output.callback_delivered = callback.deliver(
                url, s.callback_secret.get_secret_value(), body, s, deadline=deadline
            )

    def _reject(self, job: dict[str, Any], runpod_id: str, output: JobOutput | dict[str, Any]) -> None:
        """A job refused before it became a ``Job``: one metrics line, and the failure callback."""
        error_code = output.error_code if isinstance(output, JobFailure) else None
        log.info("job rejected", extra={"event": "job_metrics", "status": "failed", "error_code": error_code})
        raw = job.get("input") if isinstance(job.get("input"), dict) else {}
        if raw.get("action", "generate") != "generate" or not isinstance(output, JobFailure):
            return
        raw_id, raw_url = raw.get("id"), raw.get("callback_url")
        output.job_id = safe_job_id(raw_id if isinstance(raw_id, str) and raw_id else runpod_id)
        self._callback(output.job_id, raw_url if isinstance(raw_url, str) else None, output)

    def _log_metrics(self, job: Job, output: JobOutput, metrics: Metrics | None, seconds: float) -> None:
        asset = metrics.asset if metrics else None
        flags = []
        if seconds > self.settings.slow_generation_s:
            flags.append("slow_generation")
        if asset and asset.file_size_bytes < self.settings.small_file_bytes and job.kind == "video":
            flags.append("small_file")
        flags.extend(metrics.flags if metrics else [])  # long videos: seam_jump
        failed = isinstance(output, JobFailure)
        log.info(
            "job finished",
            extra={
                "event": "job_metrics",
                "worker": "wan",
                "job_type": job.job_type,
                "status": "failed" if failed else "completed",
                "error_code": output.error_code if failed else None,
                "generation_time": round(seconds, 3),
                "timings": metrics.timings if metrics else None,
                "video_duration": asset.duration_seconds if asset else None,
                "file_size": asset.file_size_bytes if asset else None,
                "resolution": f"{job.width}x{job.height}",
                "fps": job.fps if job.kind == "video" else None,
                "quality": metrics.quality if metrics else job.quality,
                "reference_mode": metrics.reference_mode if metrics else job.reference_mode_requested,
                "enhancement_applied": metrics.enhancement_applied if metrics else False,
                "peak_vram_gib": metrics.peak_vram_gib if metrics else None,
                "prompt_sha256": hashlib.sha256(job.prompt.encode()).hexdigest()[:16],
                "prompt_chars": len(job.prompt),
                "flags": flags,
            },
        )


def _unexpected(exc: Exception) -> WorkerError:
    """An exception no stage mapped: a CUDA fault restarts the worker, anything else is internal."""
    if cuda_error(exc):  # the CUDA context may be broken: fail retryable and restart the worker
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return WorkerError(
            f"CUDA error ({first_line}); the job was not completed and this worker restarts",
            code=ErrorCode.CUDA_ERROR,
            retryable=True,
            refresh_worker=True,
        )
    return WorkerError(f"internal error ({type(exc).__name__}); the job was not completed")


_CUDA_ERROR = re.compile(r"CUDA error|CUDA out of memory|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error")


def cuda_error(exc: BaseException) -> bool:
    """A device fault after which RunPod should restart the worker (``refresh_worker``)."""
    if isinstance(exc, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
        return True
    return isinstance(exc, RuntimeError) and bool(_CUDA_ERROR.search(str(exc)))


def safe_job_id(value: str) -> str:
    """Job ids become storage keys: anything but a plain id is replaced by its hash."""
    return value if _SAFE_ID.match(value) else "job-" + hashlib.sha256(value.encode()).hexdigest()[:24]


_worker: Worker | None = None


def get_worker() -> Worker:
    global _worker
    if _worker is None:
        settings = get_settings()
        logs.configure(settings.log_level, settings.secret_values(), settings.runpod_log_level)
        _worker = Worker(settings)
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod serverless handler. The job runs in a thread, so with ``WORKER_CONCURRENCY=2``
    the SDK can start a second job while the first encodes, uploads and calls back; the GPU
    stages take turns behind the runtime's lock (``flow.on_gpu``)."""
    worker = get_worker()
    return await asyncio.to_thread(worker.handle, job)


#: Two jobs at once overlap one job's CPU tail (encode, upload, callback) with the other's GPU
#: stages; a third would only wait for the GPU.
MAX_CONCURRENCY = 2


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
            f"WORKER_CONCURRENCY={worker.settings.worker_concurrency} capped at {MAX_CONCURRENCY}: one job uses "
            "the GPU while the other encodes and uploads; a third would only wait"
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
