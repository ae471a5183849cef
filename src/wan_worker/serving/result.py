"""The report stage: the typed job result and the metrics line, built from the stages' outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from wan_worker.contract.schema import Asset, AssetMetadata, JobMetadata, JobResult
from wan_worker.serving.flow import Generation, JobRun, Prompts, References, Stored
from wan_worker.stages.enhance import Enhancement
from wan_worker.stages.generate import Conditioning
from wan_worker.stages.media import EncodedMedia
from wan_worker.stages.references import RESIZE_POLICY


@dataclass
class Metrics:
    """What the per-job metrics log line reports beyond the job itself."""

    quality: str
    reference_mode: str
    timings: dict[str, float]
    peak_vram_gib: float | None
    enhancement_applied: bool
    asset: AssetMetadata
    flags: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    result: JobResult
    metrics: Metrics


def asset(
    run: JobRun,
    media: EncodedMedia,
    stored: Stored,
    refs: References,
    pipeline: str,
    cond: Conditioning | None,
    conditioning: dict[str, Any] | None,
    loras_applied: list[dict[str, Any]] | None = None,
) -> Asset:
    """The asset and its metadata; ``cond`` gives the strengths (None: no reference conditioning)."""
    job = run.job
    return Asset(
        type=job.kind,
        url=stored.asset.url,
        thumbnail_url=stored.thumbnail.url,
        path=stored.asset.path,
        thumbnail_path=stored.thumbnail.path,
        metadata=AssetMetadata(
            width=media.width,
            height=media.height,
            frames=media.frames,
            fps=media.fps,
            duration_seconds=media.duration_seconds,
            file_size_bytes=stored.file_size,
            format=media.format,  # type: ignore[arg-type]
            seed=job.seed,
            pipeline=pipeline,  # type: ignore[arg-type]
            reference_mode_requested=job.reference_mode_requested,
            reference_mode_applied=refs.mode,  # type: ignore[arg-type]
            denoise_strength=cond.denoise_strength if cond else None,
            conditioning_scale=cond.conditioning_scale if cond else None,
            resize_policy=RESIZE_POLICY if refs.images else None,
            conditioning=conditioning,
            **({"loras_applied": loras_applied} if loras_applied is not None else {}),
        ),
    )


def common_metadata(run: JobRun, peak_vram_gib: float | None) -> dict[str, Any]:
    """Timing fields every job reports; call last, after the final stage's timing."""
    run.timings["total"] = time.perf_counter() - run.started
    return {
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "total_seconds": round(run.timings["total"], 3),
        "peak_vram_gib": round(peak_vram_gib, 2) if peak_vram_gib is not None else None,
    }


def enhancement_fields(enhancement: Enhancement | None) -> dict[str, Any]:
    if enhancement is None:
        return {"enhancement_applied": False}
    return {
        "original_prompt": enhancement.original_prompt,
        "enhanced_prompt": enhancement.enhanced_prompt if enhancement.enhancement_applied else None,
        "enhancement_applied": enhancement.enhancement_applied,
        "enhancement_source": enhancement.enhancement_source,
        "enhancement_time": round(enhancement.enhancement_time, 3),
        "enhancement_cache_hit": enhancement.cache_hit,
        "enhancement_reason": enhancement.reason,
    }


def single_pass(
    run: JobRun,
    refs: References,
    prompts: Prompts,
    generation: Generation,
    media: EncodedMedia,
    stored: Stored,
    model: str,
    loras_applied: list[dict[str, Any]],
) -> Outcome:
    job, run_job, generated, cond = run.job, generation.run_job, generation.generated, generation.cond
    timing = common_metadata(run, generation.peak_vram_gib)
    item = asset(run, media, stored, refs, cond.pipeline, cond, cond.summary(), loras_applied)
    metadata = JobMetadata(
        job_type=job.job_type,
        quality=run_job.quality,
        steps=generated.steps_run,
        scheduler_steps=run_job.steps,
        guidance_scale=run_job.guidance_scale,
        flow_shift=job.flow_shift,
        sampler=run_job.sampler,
        timesteps=generated.timesteps,
        model=model,
        sampling_sources=run_job.sampling_sources,
        seed=job.seed,
        seed_source=job.seed_source,
        negative_prompt=job.negative_prompt,
        prompt=prompts.used[0],
        step_cache={"mode": job.step_cache, "threshold": generated.step_cache_threshold},
        denoise_source=job.denoise_source,
        quality_degraded=generation.degraded,
        **timing,
        **enhancement_fields(prompts.enhancements[job.prompt] if job.enhance_prompt else None),
    )
    return _outcome(run, item, metadata, refs, run_job.quality)


def _outcome(
    run: JobRun, item: Asset, metadata: JobMetadata, refs: References, quality: str, flags: list[str] | None = None
) -> Outcome:
    result = JobResult(job_id=run.job.job_id, assets=[item], metadata=metadata, warnings=run.warnings)
    metrics = Metrics(
        quality=quality,
        reference_mode=refs.mode,
        timings=metadata.timings,
        peak_vram_gib=metadata.peak_vram_gib,
        enhancement_applied=metadata.enhancement_applied,
        asset=item.metadata,
        flags=flags or [],
    )
    return Outcome(result, metrics)


def long_video(
    run: JobRun,
    refs: References,
    prompts: Prompts,
    media: EncodedMedia,
    stored: Stored,
    segments: list[dict[str, Any]],
    conds: list[Conditioning],
    seams: tuple[list[dict[str, Any]], float | None],
    estimate: float,
    segment_frames_max: int,
    peak_vram_gib: float | None,
    flags: list[str],
) -> Outcome:
    job = run.job
    timing = common_metadata(run, peak_vram_gib)
    vace = [c for c in conds if c.pipeline == "vace"]
    conditioning = {
        "segments": len(segments),
        "kept_frames": [s["kept_frames"] for s in segments],
        "reference_images": [len(c.kwargs.get("reference_images") or []) for c in conds],
    }
    item = asset(run, media, stored, refs, "vace" if vace else "t2v", vace[0] if vace else None, conditioning)
    enhanced = [e for e in prompts.enhancements.values() if e is not None]
    metadata = JobMetadata(
        job_type=job.job_type,
        quality=job.quality,
        steps=segments[0]["steps"],
        scheduler_steps=job.steps,
        guidance_scale=job.guidance_scale,
        flow_shift=job.flow_shift,
        seed=job.seed,
        seed_source=job.seed_source,
        negative_prompt=job.negative_prompt,
        prompt=prompts.used[0],
        step_cache={"mode": job.step_cache, "threshold": segments[0]["step_cache_threshold"]},
        denoise_source=job.denoise_source,
        quality_degraded=None,
        **timing,
        frames_requested=job.requested_frames,
        length_field=job.length_field,
        overlap_frames=job.overlap_frames,
        segment_frames_max=segment_frames_max,
        estimated_seconds=round(estimate, 1),
        segments=segments,
        seams=seams[0],
        max_seam_ratio=seams[1],
        enhancement_applied=any(e.enhancement_applied for e in enhanced),
        **({"enhancement_cache_hits": sum(e.cache_hit for e in enhanced)} if enhanced else {}),
    )
    return _outcome(run, item, metadata, refs, job.quality, flags)
