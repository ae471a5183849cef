"""Normalise a validated ``JobInput`` into the one internal ``Job`` the worker runs.

Precedence, everywhere: explicit front-end field, then ``config`` override, then the
job type's preset. Every value that was changed (rounded to a valid grid) or ignored is
recorded, so the output can say so instead of silently dropping it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal

from wan_worker.contract import presets as P
from wan_worker.contract.errors import InvalidInput
from wan_worker.contract.presets import ReferenceMode
from wan_worker.contract.schema import JobInput

#: Where each reference can come from, in precedence order.
REFERENCE_SOURCES: dict[P.ReferenceRole, tuple[tuple[str, str], ...]] = {
    "single": (("reference_image_url", ""), ("image", "config"), ("reference_image_url", "metadata")),
    "start": (("first_frame", ""), ("first_frame", "config"), ("start_reference_url", "metadata")),
    "end": (("last_frame", ""), ("last_frame", "config"), ("end_reference_url", "metadata")),
}


@dataclass(frozen=True)
class ReferenceSource:
    role: P.ReferenceRole
    value: str
    field: str  # e.g. "first_frame" or "metadata.start_reference_url"


@dataclass(frozen=True)
class LoraRequest:
    name: str
    scale: float
    field: str  # e.g. "loras[0]" or "config.loras[1]"


@dataclass
class Job:
    job_id: str
    user_id: str | None
    job_type: str
    kind: P.OutputKind
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    quality: P.Quality
    steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    seed_source: Literal["request", "random"]
    enhance_prompt: bool
    step_cache: P.StepCache
    reference_mode_requested: ReferenceMode
    references: dict[str, ReferenceSource]
    denoise_strength: float | None
    denoise_source: str | None
    exact_copy_mode: bool
    strict_references: bool
    callback_url: str | None
    adjustments: list[str] = field(default_factory=list)
    ignored_overrides: list[str] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)
    #: How the scheduler steps; ``dmd`` runs ``timesteps`` (one forward each), ``unipc`` ``steps``.
    sampler: P.Sampler = "unipc"
    timesteps: tuple[int, ...] | None = None
    loras: tuple[LoraRequest, ...] = ()
    #: Where steps, guidance_scale, flow_shift and sampler came from (a LoRA sidecar may set them).
    sampling_sources: dict[str, str] = field(default_factory=dict)
    #: Long videos (long_video.py): the exact frame count asked for (``num_frames`` is that
    #: count snapped for one pass), the field it came from, and the storyboard.
    requested_frames: int = 1
    length_field: str = "frame_num"
    frames_adjustment: str | None = None
    overlap_frames: int = P.DEFAULT_OVERLAP
    segment_prompts: list[str] = field(default_factory=list)

    @property
    def pipeline(self) -> P.Pipeline:
        """The pipeline the references ask for (before any fetch fallback)."""
        if self.reference_mode_requested == "none":
            return "t2v"
        return "i2i" if self.kind == "image" else "vace"

    def with_quality(self, quality: P.Quality) -> Job:
        """A copy at a lower quality preset (the out-of-memory degrade path).

        Steps and guidance only ever go down: a job that asked for fewer steps keeps them.
        """
        preset = P.QUALITY_PRESETS[quality]
        clone = Job(**{**self.__dict__, "adjustments": list(self.adjustments)})
        clone.quality = quality
        clone.steps = min(self.steps, preset.steps)
        clone.guidance_scale = min(self.guidance_scale, preset.guidance_scale)
        return clone


def _first(*candidates: tuple[object, str]) -> tuple[object, str] | tuple[None, None]:
    for value, name in candidates:
        if value is not None:
            return value, name
    return None, None


def build_job(inp: JobInput, job_id: str, default_quality: P.Quality | None = None) -> Job:
    """``default_quality`` (DEFAULT_QUALITY) applies when the job gives no quality, over the
    job type's preset quality."""
    preset = P.JOB_TYPES[inp.job_type]
    cfg = inp.config
    adjustments: list[str] = []
    ignored = sorted(f"config.{k}" for k in (cfg.model_extra or {}))

    width, height = _size(inp, adjustments)

    fps_value, _ = _first((inp.fps, "fps"), (cfg.fps, "config.fps"))
    fps = int(fps_value or P.DEFAULT_FPS)
    frames_adjustment = None
    if preset.kind == "image":
        _refuse_long_fields(inp)
        frames = requested = 1
        name = "frame_num"
        for value, field_name in ((inp.frame_num, "frame_num"), (cfg.frame_num, "config.frame_num")):
            if value is not None and value != 1:
                ignored.append(f"{field_name} (image job types make one frame)")
    else:
        requested, name = _requested_frames(inp, fps, adjustments)
        frames = requested
        if requested <= P.FRAMES_MAX:  # one pass: Wan's 4k+1 grid
            frames = P.nearest_valid_frames(requested)
            if frames != requested:
                given = f"{requested}" if inp.duration_seconds is None else f"{inp.duration_seconds:g} s = {requested}"
                frames_adjustment = f"{name}: {given} -> {frames} (Wan needs 4k+1 frames)"
                adjustments.append(frames_adjustment)

    seed_value, _ = _first((inp.seed, "seed"), (cfg.seed, "config.seed"))
    if seed_value is None or seed_value == -1:
        seed, seed_source = secrets.randbelow(P.SEED_MAX + 1), "random"
    else:
        seed, seed_source = int(seed_value), "request"

    negative, _ = _first((inp.negative_prompt, ""), (cfg.negative_prompt, ""))
    references = _references(inp)
    mode = _reference_mode(inp, references, adjustments)
    denoise, denoise_source = _denoise(inp)
    quality = _quality(inp, default_quality, preset.quality, mode, adjustments)
    qp = P.QUALITY_PRESETS[quality]

    job = Job(
        job_id=job_id,
        user_id=inp.user_id,
        job_type=inp.job_type,
        kind=preset.kind,
        prompt=inp.prompt.strip() if inp.prompt else "",
        negative_prompt=str(negative or ""),
        width=width,
        height=height,
        num_frames=frames,
        fps=fps,
        quality=quality,
        steps=cfg.num_inference_steps or qp.steps,
        guidance_scale=cfg.guidance_scale if cfg.guidance_scale is not None else qp.guidance_scale,
        flow_shift=cfg.sample_shift if cfg.sample_shift is not None else P.DEFAULT_FLOW_SHIFT,
        seed=seed,
        seed_source=seed_source,
        enhance_prompt=preset.enhance_prompt if inp.enhance_prompt is None else inp.enhance_prompt,
        step_cache=inp.step_cache,
        reference_mode_requested=mode,
        references={role: references[role] for role in _roles(mode, preset.kind, references)},
        denoise_strength=denoise,
        denoise_source=denoise_source,
        exact_copy_mode=inp.metadata.exact_copy_mode,
        strict_references=inp.strict_references,
        callback_url=inp.callback_url,
        adjustments=adjustments,
        ignored_overrides=ignored,
        ignored_fields=inp.ignored_fields,
        loras=_loras(inp),
        sampling_sources={
            "steps": "config.num_inference_steps" if cfg.num_inference_steps else f"quality:{quality}",
            "guidance_scale": "config.guidance_scale" if cfg.guidance_scale is not None else f"quality:{quality}",
            "flow_shift": "config.sample_shift" if cfg.sample_shift is not None else "default",
            "sampler": "default",
        },
        requested_frames=requested,
        length_field=name,
        frames_adjustment=frames_adjustment,
        overlap_frames=inp.overlap_frames or P.DEFAULT_OVERLAP,
        segment_prompts=list(inp.segment_prompts or []),
    )
    _apply_strength_policy(job)
    if quality == "turbo":
        _apply_turbo(job, inp)
    return job


def _quality(
    inp: JobInput, default: P.Quality | None, preset: P.Quality, mode: ReferenceMode, adjustments: list[str]
) -> P.Quality:
    """The job's quality, else DEFAULT_QUALITY, else the job type's.

    Turbo has no reference-conditioned model (references run VACE or image-to-image), so a job
    that asks for turbo with references is refused; one that only inherits turbo from
    DEFAULT_QUALITY runs at its job type's quality instead, and says so.
    """
    requested, name = _first((inp.quality, "quality"), (inp.config.quality, "config.quality"))
    if requested is not None:
        if requested == "turbo" and mode != "none":
            raise InvalidInput(
                f"{name} 'turbo' can't be used with reference images: reference modes run VACE or "
                "image-to-image, which have no distilled model; use quality fast, balanced or high, "
                "or send no reference",
                field=name,
            )
        return requested  # type: ignore[return-value]
    if default == "turbo" and mode != "none":
        adjustments.append(
            f"DEFAULT_QUALITY 'turbo' doesn't apply to reference modes (no distilled model); "
            f"ran at the job type's quality '{preset}'"
        )
        return preset
    return default or preset


def _apply_turbo(job: Job, inp: JobInput) -> None:
    """The distilled schedule: fixed timesteps, no CFG, no step cache. Overrides that the
    distilled model can't honour are reported, never silently dropped."""
    cfg = inp.config
    steps = cfg.num_inference_steps or len(P.TURBO_TIMESTEPS)
    if steps > len(P.TURBO_TIMESTEPS):
        raise InvalidInput(
            f"config.num_inference_steps: quality 'turbo' runs at most {len(P.TURBO_TIMESTEPS)} steps "
            f"(the distilled timesteps {list(P.TURBO_TIMESTEPS)}), got {steps}",
            field="config.num_inference_steps",
        )
    job.sampler = "dmd"
    job.timesteps = P.TURBO_TIMESTEPS[:steps]
    job.steps = steps
    turbo = "quality:turbo"
    job.sampling_sources.update(
        steps="config.num_inference_steps" if cfg.num_inference_steps else turbo,
        guidance_scale=turbo,
        flow_shift=turbo,
        sampler=turbo,
    )
    if cfg.guidance_scale is not None and cfg.guidance_scale != 1.0:
        job.adjustments.append(
            f"config.guidance_scale {cfg.guidance_scale:g} ignored: quality 'turbo' runs without "
            "classifier-free guidance (1.0)"
        )
    job.guidance_scale = 1.0
    if cfg.sample_shift is not None and cfg.sample_shift != P.TURBO_FLOW_SHIFT:
        job.adjustments.append(
            f"config.sample_shift {cfg.sample_shift:g} ignored: quality 'turbo' runs its distilled timesteps"
        )
    job.flow_shift = P.TURBO_FLOW_SHIFT
    if job.negative_prompt:
        job.adjustments.append("negative_prompt unused: quality 'turbo' runs without classifier-free guidance")
        job.negative_prompt = ""
    if job.step_cache == "on":
        job.adjustments.append("step_cache 'on' ignored: quality 'turbo' runs every one of its few steps")
    job.step_cache = "off"


def _loras(inp: JobInput) -> tuple[LoraRequest, ...]:
    """The front-end ``loras`` list, else ``config.loras`` (the usual precedence)."""
    specs, where = (inp.loras, "loras") if inp.loras is not None else (inp.config.loras, "config.loras")
    return tuple(LoraRequest(s.name, float(s.scale), f"{where}[{i}]") for i, s in enumerate(specs or ()))


def _requested_frames(inp: JobInput, fps: int, adjustments: list[str]) -> tuple[int, str]:
    """The frame count asked for, exact. ``duration_seconds`` wins over ``frame_num``.

    A duration becomes ``round(duration * fps)`` frames, so the clip lasts that long; a
    count above the single-pass limit is kept exact (the segment plan makes it exact), a
    count within it is snapped to 4k+1 by the caller, as ``frame_num`` always was.
    """
    frames, name = _first((inp.frame_num, "frame_num"), (inp.config.frame_num, "config.frame_num"))
    if inp.duration_seconds is not None:
        if frames is not None:
            adjustments.append(f"{name} {frames} ignored: duration_seconds {inp.duration_seconds:g} wins")
        return max(1, int(inp.duration_seconds * fps + 0.5)), "duration_seconds"
    if frames is None:
        return P.JOB_TYPES[inp.job_type].frames, "frame_num"
    if frames > fps * 60 + 1:
        raise InvalidInput(f"{name}: at most {fps * 60 + 1} frames (60 s at {fps} fps)", field=name)
    return int(frames), name


def _refuse_long_fields(inp: JobInput) -> None:
    """Long videos and storyboards are video-only: an image job must not drop them silently."""
    for name in ("duration_seconds", "overlap_frames", "segment_prompts"):
        if getattr(inp, name) is not None:
            raise InvalidInput(f"{name}: only video job types make long videos", field=name)


def _size(inp: JobInput, adjustments: list[str]) -> tuple[int, int]:
    cfg = inp.config
    cfg_w = cfg_h = None
    if cfg.size:
        cfg_w, cfg_h = (int(v) for v in cfg.size.split("*"))
    result = []
    for axis, top, override, from_size, default in (
        ("width", inp.width, cfg.width, cfg_w, P.DEFAULT_WIDTH),
        ("height", inp.height, cfg.height, cfg_h, P.DEFAULT_HEIGHT),
    ):
        value, name = _first((top, axis), (override, f"config.{axis}"), (from_size, "config.size"))
        if value is None:
            result.append(default)
            continue
        snapped = max(P.SIZE_MIN, min(P.SIZE_MAX, round(int(value) / P.SIZE_MULTIPLE) * P.SIZE_MULTIPLE))
        if snapped != value:
            adjustments.append(f"{name} {axis}: {value} -> {snapped} (multiple of {P.SIZE_MULTIPLE})")
        result.append(snapped)
    return result[0], result[1]


def _references(inp: JobInput) -> dict[str, ReferenceSource]:
    found: dict[str, ReferenceSource] = {}
    for role, sources in REFERENCE_SOURCES.items():
        for name, where in sources:
            holder = {"": inp, "config": inp.config, "metadata": inp.metadata}[where]
            value = getattr(holder, name, None)
            if value:
                found[role] = ReferenceSource(role, value, f"{where}.{name}" if where else name)  # type: ignore[arg-type]
                break
    return found


def _reference_mode(inp: JobInput, refs: dict[str, ReferenceSource], adjustments: list[str]) -> ReferenceMode:
    if inp.reference_mode is not None:
        mode = inp.reference_mode
        if mode == "none" and refs:
            adjustments.append("reference_mode 'none': the given reference images are not used")
        needed = {"single": ("single",), "start": ("start",), "end": ("end",), "both": ("start", "end")}.get(mode, ())
        for role in needed:
            if role not in refs:
                names = " or ".join(f"{w}.{n}" if w else n for n, w in REFERENCE_SOURCES[role])
                raise InvalidInput(
                    f"reference_mode '{mode}' needs an image in {names}",
                    field=REFERENCE_SOURCES[role][0][0],
                )
        return mode
    if "start" in refs and "end" in refs:
        return "both"
    for role in ("start", "end", "single"):
        if role in refs:
            return role  # type: ignore[return-value]
    return "none"


def _roles(mode: ReferenceMode, kind: P.OutputKind, refs: dict[str, ReferenceSource]) -> tuple[str, ...]:
    if mode == "none":
        return ()
    if kind == "image":
        # Image-to-image takes one picture: the subject reference, else the start frame, else the end.
        role = "single" if mode == "single" else ("start" if mode in ("start", "both") else "end")
        return (role,)
    return {"single": ("single",), "start": ("start",), "end": ("end",), "both": ("start", "end")}[mode]


def _denoise(inp: JobInput) -> tuple[float | None, str | None]:
    value, name = _first(
        (inp.denoise_strength, "denoise_strength"),
        (inp.config.denoise_strength, "config.denoise_strength"),
        (inp.metadata.denoise_strength, "metadata.denoise_strength"),
    )
    if value is not None:
        return float(value), name
    value, name = _first(
        (inp.reference_strength, "reference_strength"),
        (inp.config.reference_strength, "config.reference_strength"),
        (inp.metadata.reference_strength, "metadata.reference_strength"),
    )
    if value is not None:
        return round(1.0 - float(value), 6), f"{name} (denoise = 1 - reference_strength)"
    return None, None


def _apply_strength_policy(job: Job) -> None:
    """Defaults for strength, and the first implementation's exact-copy clamp for I2I."""
    if job.pipeline == "t2v":
        return
    if job.denoise_strength is None:
        job.denoise_strength = P.DEFAULT_I2I_DENOISE if job.pipeline == "i2i" else P.DEFAULT_VACE_DENOISE
        job.denoise_source = "default"
    if job.pipeline == "i2i" and job.exact_copy_mode:
        clamped = min(job.denoise_strength, 0.05)
        if clamped != job.denoise_strength:
            job.adjustments.append(f"exact_copy_mode: denoise_strength {job.denoise_strength} -> {clamped}")
        job.denoise_strength = clamped
        job.guidance_scale = 1.0
        job.negative_prompt = ""
        job.steps = P.exact_copy_steps(clamped)
        job.sampling_sources.update(steps="exact_copy_mode", guidance_scale="exact_copy_mode")
        job.adjustments.append(f"exact_copy_mode: guidance_scale 1.0, no negative prompt, {job.steps} steps")
