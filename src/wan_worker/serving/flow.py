"""The stages a generation job flows through, shared by single-pass and long videos.

Each stage takes the job in flight (``JobRun``) and the worker's runtime (``Runtime``) and
returns a typed value for the next one; ``worker.Worker.generate`` and
``long_video.LongVideo.generate`` call them in order. Stages add their timings and warnings to
the ``JobRun``; nothing else is shared between them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from wan_worker.contract import presets as P
from wan_worker.contract.errors import ErrorCode, GenerationFailed, JobTimeout, ReferenceUnavailable, WorkerError
from wan_worker.contract.jobs import Job
from wan_worker.contract.settings import Settings
from wan_worker.runtime.models import ModelManager
from wan_worker.runtime.readiness import Readiness
from wan_worker.stages.enhance import Enhancement, Enhancer
from wan_worker.stages.generate import Conditioning, Generated, Generator
from wan_worker.stages.media import EncodedMedia, VideoStream, encode
from wan_worker.stages.progress import Progress
from wan_worker.stages.references import ReferenceFetchError, load_reference, prepare
from wan_worker.stages.segments import CostModel
from wan_worker.stages.storage import Storage, StoredObject

log = logging.getLogger("wan_worker")


@dataclass
class Runtime:
    """The process-wide parts the stages use (owned by ``Worker``)."""

    settings: Settings
    manager: ModelManager
    generator: Generator
    enhancer: Enhancer
    storage: Storage
    readiness: Readiness
    costs: CostModel
    #: Held by a job's GPU stages (plan to generate), so that with ``WORKER_CONCURRENCY=2`` one
    #: job encodes, uploads and calls back while the other uses the GPU.
    gpu: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class JobRun:
    """One job in flight: the job, its clock and deadline, and what stages report on the way."""

    job: Job
    runpod_id: str
    progress: Progress
    started: float
    deadline: float
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def check_deadline(self, settings: Settings, where: str) -> None:
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={settings.job_timeout_s:g}s {where}")


@dataclass
class References:
    """The reference mode that applies (``none`` after a fallback) and its prepared images."""

    mode: str
    images: dict[str, Image.Image] = field(default_factory=dict)


@dataclass
class Prompts:
    """The prompts generation uses, and each distinct given prompt's enhancement (None if off)."""

    used: list[str]
    enhancements: dict[str, Enhancement | None]


@dataclass
class Generation:
    """A single-pass job's frames and how they were made (the quality may have degraded).
    A video's frames are already in ``stream``, encoding since they were decoded."""

    generated: Generated
    run_job: Job
    cond: Conditioning
    degraded: dict[str, str] | None
    peak_vram_gib: float | None
    stream: VideoStream | None = None


@dataclass
class Stored:
    asset: StoredObject
    thumbnail: StoredObject
    file_size: int


# -- 1. validate ---------------------------------------------------------------------------------


def start(rt: Runtime, job: Job, runpod_id: str, progress: Progress, started: float) -> JobRun:
    """The job in flight, with the adjustments validation made as its first warnings."""
    rt.readiness.check_work_dir()
    run = JobRun(job, runpod_id, progress, started, time.monotonic() + rt.settings.job_timeout_s)
    run.timings["validating"] = time.perf_counter() - started
    run.warnings.extend(job.adjustments)
    if job.ignored_overrides:
        run.warnings.append("ignored overrides: " + ", ".join(job.ignored_overrides))
    if job.ignored_fields:
        run.warnings.append("ignored fields: " + ", ".join(job.ignored_fields))
    return run


@contextlib.contextmanager
def on_gpu(rt: Runtime, run: JobRun) -> Iterator[None]:
    """Hold the GPU for a job's GPU stages; time spent waiting for another job's is reported
    as ``waiting_for_gpu`` (and counts against the job's deadline, like any stage)."""
    t = time.perf_counter()
    with rt.gpu:
        waited = time.perf_counter() - t
        if waited > 0.01:
            run.timings["waiting_for_gpu"] = waited
        yield


# -- 3. references -------------------------------------------------------------------------------


def fetch_references(rt: Runtime, run: JobRun) -> References:
    """Fetch and prepare the job's references; fall back to text-to-video (or -image), visibly."""
    job = run.job
    if not job.references:
        return References("none")
    run.progress.enter("fetching_references")
    t = time.perf_counter()
    images = {}
    try:
        for role, source in job.references.items():
            try:
                image = load_reference(source.value, rt.settings, run.deadline)
                images[role] = prepare(image, job.width, job.height)
            except ReferenceFetchError as exc:
                reason = f"{source.field}: {exc}"
                if job.strict_references:
                    raise ReferenceUnavailable(f"reference image unusable: {reason}", field=source.field) from None
                run.warnings.append(
                    f"reference image unusable ({reason}); fell back to text-to-{job.kind} (reference_mode_applied: none)"
                )
                log.warning("reference fallback", extra={"reason": reason})
                return References("none")
    finally:
        run.timings["fetching_references"] = time.perf_counter() - t
    return References(job.reference_mode_requested, images)


def load(rt: Runtime, run: JobRun, pipelines: list[str]) -> None:
    """Make the pipelines resident (the generator owns the model manager's loading)."""
    if not rt.generator.missing(pipelines):
        return
    run.progress.enter("loading")
    with rt.readiness.loading(rt.manager):
        seconds = rt.generator.load(pipelines)
    run.timings["loading"] = seconds


# -- 4. enhance ----------------------------------------------------------------------------------


def enhance(rt: Runtime, run: JobRun, given: list[str], *, segments: bool = False) -> Prompts:
    """Each distinct prompt enhanced once (the Enhancer also caches across jobs)."""
    job = run.job
    enhancements: dict[str, Enhancement | None] = dict.fromkeys(given)
    if not job.enhance_prompt:
        return Prompts(given, enhancements)
    run.progress.enter("enhancing")
    t = time.perf_counter()
    for prompt in enhancements:
        result = rt.enhancer.enhance(prompt, job.job_type, job.quality)
        enhancements[prompt] = result
        if not result.enhancement_applied:
            run.warnings.append(
                f"prompt enhancement not applied ({result.reason}) for a segment prompt; the original was used"
                if segments
                else f"prompt enhancement not applied ({result.reason}); the original prompt was used"
            )
    run.timings["enhancing"] = time.perf_counter() - t
    return Prompts([enhancements[p].enhanced_prompt for p in given], enhancements)  # type: ignore[union-attr]


# -- 5. generate ---------------------------------------------------------------------------------


def generate(rt: Runtime, run: JobRun, prompt: str, cond: Conditioning, refs: References, out_dir: Path) -> Generation:
    """Generate, a video streaming into ``out_dir``'s MP4 as it is decoded; on CUDA
    out-of-memory free memory and retry once at the next lower quality, then fail retryable
    and ask for a fresh worker."""
    job = run.job
    run.check_deadline(rt.settings, "before generation")
    run.progress.enter("generating", step=0, total_steps=job.steps, reference_mode=refs.mode)
    reset_peak_memory()
    run_job, degraded = job, None

    def attempt(attempt_job: Job) -> tuple[Generated, VideoStream | None]:
        stream = VideoStream(out_dir / "0.mp4", job.fps) if job.kind == "video" else None
        try:
            sink = stream.append if stream is not None else None
            return rt.generator.generate(attempt_job, prompt, cond, run.progress, run.deadline, sink), stream
        except BaseException:
            if stream is not None:
                stream.abort()  # a retry starts the file over
            raise

    try:
        generated, stream = attempt(job)
    except torch.OutOfMemoryError:
        rt.manager.free_memory()
        lower = P.QUALITY_DEGRADE.get(job.quality, job.quality)
        degraded = {"from": job.quality, "to": lower, "reason": "CUDA out of memory"}
        run.warnings.append(f"out of GPU memory at quality '{job.quality}'; retried once at '{lower}'")
        log.warning("out of memory, degrading quality", extra=degraded)
        run_job = job.with_quality(lower)  # type: ignore[arg-type]
        try:
            generated, stream = attempt(run_job)
        except torch.OutOfMemoryError:
            rt.manager.free_memory()
            raise GenerationFailed(
                f"out of GPU memory, also after retrying at quality '{lower}'",
                code=ErrorCode.OUT_OF_MEMORY,
                retryable=True,
                refresh_worker=True,
            ) from None
    run.timings.update(generated.timings)
    forwards = generated.steps_run * (2 if run_job.guidance_scale > 1.0 else 1)
    rt.costs.record(cond.pipeline, job.width, job.height, job.num_frames, forwards, generated.timings)
    return Generation(generated, run_job, cond, degraded, peak_memory_gib(), stream)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None


# -- 6. encode -----------------------------------------------------------------------------------


@contextlib.contextmanager
def work_dir(settings: Settings, job: Job) -> Iterator[Path]:
    """The job's own temp directory under WORK_DIR, gone whatever happens."""
    with tempfile.TemporaryDirectory(prefix=f"wan-{job.job_id}-", dir=settings.work_dir) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def disk_full_is_retryable(settings: Settings, kind: str) -> Iterator[None]:
    """No space left while writing the media: ``disk_full``, retryable on another worker."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise WorkerError(
            f"disk full: no space left in WORK_DIR ({settings.work_dir or tempfile.gettempdir()}) while writing "
            f"the {kind}; the job was not completed",
            code=ErrorCode.DISK_FULL,
            retryable=True,
        ) from None


def encode_media(rt: Runtime, run: JobRun, generation: Generation, out_dir: Path) -> EncodedMedia:
    """Finish the asset and its thumbnail; for a video, what encoding is left after the decode."""
    job, stream = run.job, generation.stream
    try:
        run.progress.observer.frames_decoded(generation.generated.frames)
        run.progress.enter("encoding")
        t = time.perf_counter()
        with disk_full_is_retryable(rt.settings, job.kind):
            media = encode(
                generation.generated.frames, out_dir, as_video=job.kind == "video", fps=job.fps, stream=stream
            )
        run.timings["encoding"] = time.perf_counter() - t
        return media
    finally:
        if stream is not None:
            stream.abort()  # after ``close`` a no-op; otherwise it stops ffmpeg


# -- 7. store ------------------------------------------------------------------------------------


def store(rt: Runtime, run: JobRun, media: EncodedMedia) -> Stored:
    """Upload the asset and its thumbnail under this RunPod job's key prefix."""
    job = run.job
    run.check_deadline(rt.settings, "before upload")
    run.progress.enter("uploading")
    t = time.perf_counter()
    names = [media.path.name, media.thumbnail_path.name]
    prefix, conflict = rt.storage.job_prefix(job.user_id, job.job_id, run.runpod_id, names)
    if conflict:
        run.warnings.append(conflict)
    asset, thumbnail = rt.storage.store(
        [
            (media.path, f"{prefix}/{names[0]}", media.content_type),
            (media.thumbnail_path, f"{prefix}/{names[1]}", "image/webp"),
        ],
        owner=run.runpod_id,
    )
    run.timings["uploading"] = time.perf_counter() - t
    return Stored(asset, thumbnail, media.path.stat().st_size)
