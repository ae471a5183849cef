"""Long videos (up to a minute) in one job: VACE-continued segments streamed into one MP4.

plan (segments.py) -> refuse at once if the estimate exceeds JOB_TIMEOUT_S -> references
-> load -> enhance each distinct prompt (cached) -> per segment: generate, colour-match and
crossfade onto the kept frames (stitch.py), append to the MP4, keep only the last K frames
for the next segment -> upload. Host memory holds one segment at a time, never the clip.

Segment 1 runs the job's own path (text-to-video, or VACE when a reference conditions it).
Every later segment is VACE with ``video`` + ``mask``: its first K frames are the previous
segment's last K decoded frames (mask black = keep), the rest gray and generated (white).
References: ``start`` conditions the first frame of segment 1, ``end`` the last frame of
the last segment, ``both`` both, and ``single`` (``reference_images``) every segment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wan_worker.contract import presets as P
from wan_worker.contract.errors import ErrorCode, GenerationFailed, InvalidInput, JobTimeout, WorkerError
from wan_worker.contract.jobs import Job
from wan_worker.serving import flow, result
from wan_worker.serving.flow import JobRun, Runtime
from wan_worker.serving.result import Outcome
from wan_worker.stages.generate import BLACK, GRAY, WHITE, Conditioning, Generated, model_pipeline
from wan_worker.stages.media import EncodedMedia, VideoStream, to_uint8, write_thumbnail
from wan_worker.stages.segments import ESTIMATE_MARGIN, Segment, plan_segments
from wan_worker.stages.stitch import SEAM_JUMP_RATIO, SeamMeter, crossfade, match_colour

log = logging.getLogger("wan_worker")

#: The quality VACE continuation segments run at, for a job quality whose own model has no
#: VACE equivalent: turbo's distilled transformer makes segment 1, and the fastest path that
#: keeps continuity after it is VACE at ``fast``. Qualities not listed run every segment at
#: the job's quality.
VACE_QUALITY: dict[str, P.Quality] = {"turbo": "fast"}


def short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LongVideo:
    """Makes the jobs that are longer than one pass, or that carry a storyboard."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings

    def applies(self, job: Job) -> bool:
        return job.kind == "video" and (
            job.requested_frames > self.settings.single_pass_max_frames or bool(job.segment_prompts)
        )

    def plan(self, job: Job) -> list[Segment]:
        """The segments, or ``invalid_input`` naming the field that makes no plan possible."""
        if job.requested_frames > self.settings.single_pass_max_frames:
            try:
                plan = plan_segments(job.requested_frames, job.overlap_frames, self.settings.segment_frames)
            except ValueError:
                raise InvalidInput(
                    f"overlap_frames: {job.overlap_frames} leaves no room for new frames in segments of "
                    f"{self.settings.segment_frames} frames (SEGMENT_FRAMES)",
                    field="overlap_frames",
                ) from None
        else:
            plan = [Segment(0, job.num_frames, 0)]
        if len(job.segment_prompts) > len(plan):
            raise InvalidInput(
                f"segment_prompts: {len(job.segment_prompts)} prompts for {len(plan)} segment(s) "
                f"({job.requested_frames if len(plan) > 1 else job.num_frames} frames)",
                field="segment_prompts",
                details={"segments": [s.frames for s in plan]},
            )
        return plan

    # -- the job: the shared stages, with segments generated and streamed into one MP4 ------

    def generate(self, run: JobRun) -> Outcome:
        rt, s, job = self.rt, self.settings, run.job
        # 2. plan, and refuse at once what cannot fit in JOB_TIMEOUT_S
        plan = self.plan(job)
        if len(plan) > 1 and job.frames_adjustment in job.adjustments:
            job.adjustments.remove(job.frames_adjustment)  # segmented: the count is exact
            run.warnings.remove(job.frames_adjustment)
        estimate = self._check_estimate(job, plan, run.deadline)
        # 3. references, and the pipelines they select per segment
        refs = flow.fetch_references(rt, run)
        pipelines = [self._pipeline(refs.mode, seg, len(plan)) for seg in plan]
        models = [
            model_pipeline(self._segment_job(job, seg, p), Conditioning(p))
            for seg, p in zip(plan, pipelines, strict=True)
        ]
        flow.load(rt, run, models)
        # 4. enhance
        given = [job.segment_prompts[i] if i < len(job.segment_prompts) else job.prompt for i in range(len(plan))]
        prompts = flow.enhance(rt, run, given, segments=True)
        run.check_deadline(s, "before generation")
        # 5.-6. generate and encode: segment by segment into the MP4
        run.progress.enter(
            "generating", step=0, total_steps=job.steps, reference_mode=refs.mode, segment=1, segments=len(plan)
        )
        flow.reset_peak_memory()
        with flow.work_dir(s, job) as out_dir:
            with flow.disk_full_is_retryable(s, "video"):
                records, meter, conds = self._segments(run, plan, pipelines, prompts.used, refs, out_dir)
            for key in ("text_encoding", "denoising", "vae_decode", "stitching"):
                run.timings[key] = sum(r["timings"][key] for r in records)
            media = EncodedMedia(
                out_dir / "0.mp4",
                out_dir / "0.thumb.webp",
                "mp4",
                "video/mp4",
                job.width,
                job.height,
                meter.frames,
                job.fps,
                round(meter.frames / job.fps, 4),
            )
            # 7. store
            stored = flow.store(rt, run, media)
        # 8. report
        seams = meter.report()
        flags = ["seam_jump"] if seams[1] is not None and seams[1] > SEAM_JUMP_RATIO else []
        return result.long_video(
            run,
            refs,
            prompts,
            media,
            stored,
            records,
            conds,
            seams,
            estimate,
            s.segment_frames,
            flow.peak_memory_gib(),
            flags,
        )

    # -- steps ----------------------------------------------------------------------------

    def _segment_job(self, job: Job, seg: Segment, pipeline: str) -> Job:
        run = job
        if pipeline == "vace" and job.quality in VACE_QUALITY:
            quality = VACE_QUALITY[job.quality]
            preset = P.QUALITY_PRESETS[quality]
            run = dataclasses.replace(
                job,
                quality=quality,
                steps=preset.steps,
                guidance_scale=preset.guidance_scale,
                flow_shift=P.DEFAULT_FLOW_SHIFT,
                sampler="unipc",
                timesteps=None,
            )
        return dataclasses.replace(run, num_frames=seg.frames, seed=(job.seed + seg.index) % (P.SEED_MAX + 1))

    @staticmethod
    def _pipeline(mode: str, seg: Segment, count: int) -> str:
        first, last = seg.index == 0, seg.index == count - 1
        if seg.kept or mode == "single" or (first and mode in ("start", "both")) or (last and mode in ("end", "both")):
            return "vace"
        return "t2v"

    def _check_estimate(self, job: Job, plan: list[Segment], deadline: float) -> float:
        """Seconds the generation should take, from measured costs; refuse at once if they
        cannot fit in what JOB_TIMEOUT_S leaves."""
        costs = self.rt.costs
        total = 0.0
        for seg in plan:
            pipeline = self._pipeline(job.reference_mode_requested, seg, len(plan))
            run = self._segment_job(job, seg, pipeline)
            forwards = run.steps * (2 if run.guidance_scale > 1.0 else 1)
            total += costs.seconds(pipeline, job.width, job.height, seg.frames, forwards)
        estimate = total * ESTIMATE_MARGIN
        left = deadline - time.monotonic()
        if estimate > left:
            length = f"{job.requested_frames / job.fps:g} s ({job.requested_frames} frames at {job.fps} fps)"
            raise WorkerError(
                f"{job.length_field}: a {length} video in {len(plan)} segments at {job.width}x{job.height}, "
                f"{job.steps} steps is estimated to take {estimate:.0f} s, more than JOB_TIMEOUT_S="
                f"{self.settings.job_timeout_s:g}s allows ({max(left, 0):.0f} s left); make it shorter, smaller "
                "or faster, or raise JOB_TIMEOUT_S",
                code=ErrorCode.JOB_TOO_LONG,
                retryable=False,
                field=job.length_field,
                details={"estimated_seconds": round(estimate, 1), "job_timeout_s": self.settings.job_timeout_s},
            )
        return estimate

    def _conditioning(
        self, job: Job, seg: Segment, count: int, mode: str, images: dict[str, Image.Image], kept: np.ndarray | None
    ) -> Conditioning:
        if self._pipeline(mode, seg, count) == "t2v":
            return Conditioning("t2v")
        kwargs: dict[str, Any] = {}
        if mode == "single":
            kwargs["reference_images"] = [images["single"]]
        start = seg.index == 0 and mode in ("start", "both")
        end = seg.index == count - 1 and mode in ("end", "both")
        if seg.kept or start or end:
            size = (job.width, job.height)
            gray, black, white = (Image.new("RGB", size, c) for c in (GRAY, BLACK, WHITE))
            video, mask = [gray] * seg.frames, [white] * seg.frames
            for i in range(seg.kept):
                video[i], mask[i] = Image.fromarray(kept[i]), black  # type: ignore[index]
            if start:
                video[0], mask[0] = images["start"], black
            if end:
                video[-1], mask[-1] = images["end"], black
            kwargs.update(video=video, mask=mask)
        denoise = job.denoise_strength
        scale = P.conditioning_scale_for(denoise) if denoise is not None else 1.0
        kwargs["conditioning_scale"] = scale
        return Conditioning("vace", kwargs, scale, denoise)

    def _generate(self, job: Job, seg: Segment, prompt: str, cond: Conditioning, progress, deadline) -> Generated:
        try:
            return self.rt.generator.generate(job, prompt, cond, progress, deadline)
        except torch.OutOfMemoryError:
            self.rt.manager.free_memory()
            raise GenerationFailed(
                f"out of GPU memory in segment {seg.index + 1} ({seg.frames} frames at {job.width}x{job.height}); "
                "the job was not completed",
                code=ErrorCode.OUT_OF_MEMORY,
                retryable=True,
                refresh_worker=True,
            ) from None

    def _segments(
        self,
        run: JobRun,
        plan: list[Segment],
        pipelines: list[str],
        prompts: list[str],
        refs: flow.References,
        out_dir: Path,
    ) -> tuple[list[dict], SeamMeter, list[Conditioning]]:
        """Generate, stitch and stream every segment; only the overlap frames outlive one."""
        job, progress, deadline, mode, images = run.job, run.progress, run.deadline, refs.mode, refs.images
        costs, count = self.rt.costs, len(plan)
        weights = [seg.frames * self._segment_job(job, seg, p).steps for seg, p in zip(plan, pipelines, strict=True)]
        records: list[dict] = []
        conds: list[Conditioning] = []
        meter = SeamMeter()
        held: np.ndarray | None = None  # uint8: the frames the next segment keeps
        stream = VideoStream(out_dir / "0.mp4", job.fps)
        try:
            for seg, pipeline_name in zip(plan, pipelines, strict=True):
                if time.monotonic() > deadline:
                    raise JobTimeout(
                        f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g}s before segment {seg.index + 1}"
                    )
                run = self._segment_job(job, seg, pipeline_name)
                cond = self._conditioning(run, seg, count, mode, images, held)
                later = sum(
                    costs.seconds(p, job.width, job.height, s.frames, run.steps * (2 if run.guidance_scale > 1 else 1))
                    for s, p in zip(plan[seg.index + 1 :], pipelines[seg.index + 1 :], strict=True)
                )
                progress.segment(
                    seg.index,
                    count,
                    done=sum(weights[: seg.index]) / sum(weights),
                    share=weights[seg.index] / sum(weights),
                    later_seconds=later,
                )
                generated = self._generate(run, seg, prompts[seg.index], cond, progress, deadline)
                frames, steps_run = generated.frames, generated.steps_run
                threshold, gen_timings = generated.step_cache_threshold, generated.timings
                del generated  # the segment's frames live in ``frames`` only
                forwards = steps_run * (2 if run.guidance_scale > 1 else 1)
                costs.record(cond.pipeline, job.width, job.height, seg.frames, forwards, gen_timings)

                t = time.perf_counter()
                if held is not None:  # stitched in float, then back to uint8
                    frames = match_colour(frames.astype(np.float32) / 255.0, held)
                    frames[: seg.kept] = crossfade(held, frames[: seg.kept])
                out = to_uint8(frames)
                del frames
                keep = plan[seg.index + 1].kept if seg.index + 1 < count else 0
                emit = out[: len(out) - keep]
                if seg.index == 0:
                    write_thumbnail(out[0], out_dir / "0.thumb.webp")
                else:
                    meter.mark_seam(meter.frames, seg.kept)
                meter.add(emit)
                stream.append(emit)
                held = out[len(out) - keep :].copy() if keep else None
                del out, emit
                stitching = time.perf_counter() - t

                conds.append(cond)
                records.append(
                    {
                        "index": seg.index,
                        "frames": seg.frames,
                        "kept_frames": seg.kept,
                        "new_frames": seg.new,
                        "pipeline": model_pipeline(run, cond),
                        "quality": run.quality,
                        "steps": steps_run,
                        "seed": run.seed,
                        "prompt_sha256": short_sha(job.segment_prompts[seg.index])
                        if seg.index < len(job.segment_prompts)
                        else short_sha(job.prompt),
                        "prompt_source": "segment_prompts" if seg.index < len(job.segment_prompts) else "prompt",
                        "step_cache_threshold": threshold,
                        "timings": {k: round(v, 3) for k, v in {**gen_timings, "stitching": stitching}.items()},
                    }
                )
            stream.close()
        except BaseException:
            stream.abort()
            raise
        return records, meter, conds
