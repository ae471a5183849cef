"""The wire contract: pydantic models for job input and output.

One input model accepts both shapes the platform sends (see README, "Input contract"):

* the front-end shape: ``{job_type, prompt, width, height, frame_num, fps, quality, seed,
  reference_mode, reference_image_url, first_frame, last_frame, denoise_strength, ...}``
* the queue shape: ``{id, type, prompt, user_id, config: {...}, metadata: {...}}``

Types are strict (``"25"`` is not a number) and ranges are checked here, so every error
names its field. Unknown top-level fields are accepted and reported back as
``ignored_fields`` (lenient, so a platform adding routing keys does not break jobs).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from wan_worker.contract import presets as P
from wan_worker.contract.errors import InvalidInput

JobTypeName = P.JobTypeName
ReferenceMode = P.ReferenceMode
Action = Literal["generate", "enhance", "health", "debug_env", "list_loras"]

_SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_IMAGE_SOURCE_MAX = 30_000_000  # chars; a data URI of a 20 MB image fits
_STRICT = ConfigDict(strict=True, populate_by_name=True, extra="allow", ser_json_inf_nan="null")

Size = Field(default=None, ge=P.SIZE_MIN, le=P.SIZE_MAX, description="multiple of 16, 256-1280")
Strength = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)


def _check_image_source(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    lowered = value[:16].lower()
    if not (lowered.startswith(("http://", "https://")) or lowered.startswith("data:image/")):
        raise ValueError("must be an http(s) URL or a data:image/...;base64 URI")
    return value


class LoraSpec(BaseModel):
    """One LoRA for a job: a file stem under ``LORA_DIR`` and its strength.

    Unknown keys are refused, so a future source field (e.g. ``url``) can be added without
    old workers silently ignoring it.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="file stem of LORA_DIR/<name>.safetensors")
    scale: float = Field(default=1.0, ge=-2.0, le=2.0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _plain_stem(cls, value: str) -> str:
        if "/" in value or "\\" in value or ".." in value or value.startswith(".") or "\x00" in value:
            raise ValueError("must be a plain file stem under LORA_DIR (no path separators, no '..', no leading '.')")
        return value


class JobConfig(BaseModel):
    """Queue-shape overrides of the preset. Unknown keys are reported as ``ignored_overrides``."""

    model_config = _STRICT

    num_inference_steps: int | None = Field(
        default=None,
        ge=P.STEPS_MIN,
        le=P.STEPS_MAX,
        validation_alias=AliasChoices("num_inference_steps", "sample_steps"),
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=P.GUIDANCE_MIN,
        le=P.GUIDANCE_MAX,
        allow_inf_nan=False,
        validation_alias=AliasChoices("guidance_scale", "sample_guide_scale"),
    )
    seed: int | None = Field(default=None, ge=-1, le=P.SEED_MAX)
    quality: P.Quality | None = None
    sample_shift: float | None = Field(default=None, ge=P.SHIFT_MIN, le=P.SHIFT_MAX, allow_inf_nan=False)
    frame_num: int | None = Field(default=None, ge=P.FRAMES_MIN, le=P.LONG_FRAMES_MAX)
    fps: int | None = Field(default=None, ge=P.FPS_MIN, le=P.FPS_MAX)
    size: str | None = Field(default=None, max_length=16, description="'WIDTH*HEIGHT', e.g. '480*832'")
    width: int | None = Size
    height: int | None = Size
    negative_prompt: str | None = Field(default=None, max_length=P.PROMPT_MAX_CHARS)
    image: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    first_frame: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    last_frame: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    denoise_strength: float | None = Strength
    reference_strength: float | None = Strength
    loras: list[LoraSpec] | None = None

    _image_sources = field_validator("image", "first_frame", "last_frame")(_check_image_source)

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.lower().replace("x", "*").split("*")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError("must look like 'WIDTH*HEIGHT', e.g. '480*832'")
        for p in parts:
            if not P.SIZE_MIN <= int(p) <= P.SIZE_MAX:
                raise ValueError(f"each side must be between {P.SIZE_MIN} and {P.SIZE_MAX}")
        return f"{int(parts[0])}*{int(parts[1])}"


class JobMetadata(BaseModel):
    """Queue-shape metadata. Reference fallbacks are read; other keys pass through untouched."""

    model_config = _STRICT

    reference_image_url: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    start_reference_url: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    end_reference_url: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    reference_strength: float | None = Strength
    denoise_strength: float | None = Strength
    exact_copy_mode: bool = False

    _image_sources = field_validator("reference_image_url", "start_reference_url", "end_reference_url")(
        _check_image_source
    )


class JobInput(BaseModel):
    """Everything a job may carry, in either accepted shape."""

    model_config = _STRICT

    action: Action = "generate"
    id: str | None = Field(default=None, pattern=_SAFE_ID, description="platform job id (queue shape)")
    user_id: str | None = Field(default=None, pattern=_SAFE_ID)
    job_type: JobTypeName = Field(default="video_fast", validation_alias=AliasChoices("job_type", "type"))
    prompt: str | None = Field(default=None, max_length=P.PROMPT_MAX_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=P.PROMPT_MAX_CHARS)
    width: int | None = Size
    height: int | None = Size
    frame_num: int | None = Field(default=None, ge=P.FRAMES_MIN, le=P.LONG_FRAMES_MAX)
    fps: int | None = Field(default=None, ge=P.FPS_MIN, le=P.FPS_MAX)
    duration_seconds: float | None = Field(
        default=None, ge=P.DURATION_MIN_S, le=P.DURATION_MAX_S, allow_inf_nan=False, description="wins over frame_num"
    )
    overlap_frames: int | None = Field(default=None, ge=P.OVERLAP_MIN, le=P.OVERLAP_MAX)
    segment_prompts: list[str] | None = Field(default=None, max_length=P.SEGMENT_PROMPTS_MAX)
    quality: P.Quality | None = None
    seed: int | None = Field(default=None, ge=-1, le=P.SEED_MAX, description="-1 or absent: random")
    enhance_prompt: bool | None = None
    step_cache: P.StepCache = "auto"
    reference_mode: ReferenceMode | None = None
    reference_image_url: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    first_frame: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    last_frame: str | None = Field(default=None, max_length=_IMAGE_SOURCE_MAX)
    denoise_strength: float | None = Strength
    reference_strength: float | None = Strength
    strict_references: bool = False
    target_worker: Literal["wan"] | None = None
    callback_url: str | None = Field(default=None, max_length=2048)
    model: Literal["qwen_base", "qwen_instruct"] = "qwen_base"
    loras: list[LoraSpec] | None = None
    config: JobConfig = Field(default_factory=JobConfig)
    metadata: JobMetadata = Field(default_factory=JobMetadata)

    _image_sources = field_validator("reference_image_url", "first_frame", "last_frame")(_check_image_source)

    @model_validator(mode="before")
    @classmethod
    def _one_job_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" in data and "job_type" in data and data["type"] != data["job_type"]:
            raise ValueError("'type' and 'job_type' disagree; send one of them")
        return data

    @model_validator(mode="after")
    def _prompt_required(self) -> JobInput:
        if self.action in ("generate", "enhance"):
            if self.prompt is None:
                raise ValueError(f"prompt: field required for action '{self.action}'")
            if not self.prompt.strip():
                raise ValueError("prompt: must not be empty")
        return self

    @field_validator("segment_prompts")
    @classmethod
    def _segment_prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise ValueError(f"entry {i} must not be empty")
            if len(prompt) > P.PROMPT_MAX_CHARS:
                raise ValueError(f"entry {i} is longer than {P.PROMPT_MAX_CHARS} characters")
        return [p.strip() for p in value]

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def parse_job_input(raw: Any) -> JobInput:
    """Validate raw job input, turning pydantic's errors into one clear ``InvalidInput``."""
    if not isinstance(raw, dict):
        raise InvalidInput(
            f"job input must be a JSON object, got {type(raw).__name__}", field="input", details={"allowed": "object"}
        )
    try:
        return JobInput.model_validate(raw)
    except ValidationError as exc:
        raise _invalid_input(exc) from None


def _invalid_input(exc: ValidationError) -> InvalidInput:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = _field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and ":" in msg:  # model-level checks prefix the field themselves
            loc, msg = (s.strip() for s in msg.split(":", 1))
        problems.append({"field": loc or "input", "message": msg})
    first = problems[0]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return InvalidInput(f"invalid input: {text}", field=first["field"], details={"problems": problems[:20]})


def _field_path(loc: tuple) -> str:
    """pydantic's location as the caller wrote it: ``config.loras[1].scale``."""
    path = ""
    for part in loc:
        if part == "function-after":
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


# --------------------------------------------------------------------------------------------
# Output


class AssetMetadata(BaseModel):
    width: int
    height: int
    frames: int
    fps: int | None
    duration_seconds: float
    file_size_bytes: int
    format: Literal["mp4", "png"]
    seed: int
    pipeline: P.Pipeline
    reference_mode_requested: ReferenceMode
    reference_mode_applied: ReferenceMode
    denoise_strength: float | None
    conditioning_scale: float | None
    resize_policy: str | None
    conditioning: dict[str, Any] | None = None
    loras_applied: list[dict[str, Any]] = []  # {"name", "scale", "sha256"} per LoRA


class Asset(BaseModel):
    type: Literal["video", "image"]
    url: str
    thumbnail_url: str
    path: str | None
    thumbnail_path: str | None
    metadata: AssetMetadata


class _Sparse(BaseModel):
    """Serialises only the fields that were given (or assigned), in declaration order: an
    optional key is absent from the output rather than ``null``, as callers have always seen it."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set or k in self._always}

    _always: ClassVar[frozenset[str]] = frozenset()


#: A number kept as given: an ``int`` stays an ``int`` in the JSON (a plain ``float`` field would turn 6 into 6.0).
Number = float | int


class JobMetadata(_Sparse):
    """The result's ``metadata``: what ran, how long each stage took, and what was adjusted.

    Single-pass jobs set the sampler fields and the ``original_prompt``... block when the prompt
    was enhanced; long videos set the segment fields instead."""

    job_type: str
    quality: P.Quality
    steps: int
    scheduler_steps: int
    guidance_scale: Number
    flow_shift: Number
    sampler: str | None = None
    timesteps: list[int] | None = None
    model: str | None = None
    sampling_sources: dict[str, Any] | None = None
    seed: int
    seed_source: str
    negative_prompt: str
    prompt: str
    step_cache: dict[str, Any]
    denoise_source: str | None
    quality_degraded: dict[str, Any] | None
    timings: dict[str, Number]
    total_seconds: Number
    peak_vram_gib: Number | None
    worker: Literal["wan"] = "wan"
    # long videos
    frames_requested: int | None = None
    length_field: str | None = None
    overlap_frames: int | None = None
    segment_frames_max: int | None = None
    estimated_seconds: Number | None = None
    segments: list[dict[str, Any]] | None = None
    seams: list[dict[str, Any]] | None = None
    max_seam_ratio: Number | None = None
    # prompt enhancement
    original_prompt: str | None = None
    enhanced_prompt: str | None = None
    enhancement_applied: bool = False
    enhancement_source: str | None = None
    enhancement_time: Number | None = None
    enhancement_cache_hit: bool | None = None
    enhancement_reason: str | None = None
    enhancement_cache_hits: int | None = None

    _always: ClassVar[frozenset[str]] = frozenset({"worker"})


class JobResult(_Sparse):
    status: Literal["completed"] = "completed"
    job_id: str
    assets: list[Asset]
    metadata: JobMetadata
    warnings: list[str] = []
    #: Set once the signed callback was attempted (``CALLBACK_URL`` and ``CALLBACK_SECRET``).
    callback_delivered: bool | None = None

    _always: ClassVar[frozenset[str]] = frozenset({"status", "warnings"})


class JobFailure(_Sparse):
    """A job that did not complete: ``WorkerError.to_output`` plus the job id and callback outcome."""

    error: str
    error_code: str
    retryable: bool
    field: str | None = None
    details: dict[str, Any] | None = None
    refresh_worker: bool | None = None
    job_id: str | None = None
    warnings: list[str] | None = None
    callback_delivered: bool | None = None


JobOutput = JobResult | JobFailure
