"""The worker's vocabularies, each defined once: job types, qualities, reference modes and
roles, pipelines. The ``Literal`` types are built from the tables, so a name added to a table
is accepted by the wire contract too.

A job type fixes what is made (one frame or a video), its default quality and whether the
prompt is enhanced. A quality preset fixes steps and guidance. Explicit job fields and
``config`` overrides win over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: ``unipc``: diffusers' UniPC multistep solver (the base model's presets). ``dmd``: one
#: forward per distilled timestep, predicting the clean latent and re-noising it (dmd.py).
Sampler = Literal["unipc", "dmd"]
OutputKind = Literal["image", "video"]
StepCache = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class QualityPreset:
    steps: int
    guidance_scale: float
    #: Whether the ``auto`` step-cache policy applies first-block caching for this quality.
    step_cache: bool


QUALITY_PRESETS: dict[str, QualityPreset] = {  # the order error messages list them in
    # The distilled model: one forward per distilled timestep, no classifier-free guidance.
    "turbo": QualityPreset(steps=3, guidance_scale=1.0, step_cache=False),
    "fast": QualityPreset(steps=25, guidance_scale=6.5, step_cache=True),
    "balanced": QualityPreset(steps=35, guidance_scale=7.0, step_cache=False),
    "high": QualityPreset(steps=50, guidance_scale=7.5, step_cache=False),
}
Quality = Literal[tuple(QUALITY_PRESETS)]  # type: ignore[valid-type]

#: The order the out-of-memory degrade path walks. ``fast`` and
#: ``turbo`` are floors: ``fast`` never drops to ``turbo``, which would load a second
#: transformer when memory is already short and swap the model the job asked for.
QUALITY_DEGRADE: dict[str, str] = {"high": "balanced", "balanced": "fast"}

#: The distilled schedule of FastWan2.1-T2V-1.3B (FastVideo's ``dmd_denoising_steps``), and the
#: shift of the 1000-step training grid its sigmas are looked up on (docs/DESIGN.md, "Turbo").
TURBO_TIMESTEPS: tuple[int, ...] = (1000, 757, 522)
TURBO_FLOW_SHIFT = 8.0


@dataclass(frozen=True)
class JobTypePreset:
    kind: OutputKind
    frames: int
    quality: Quality
    enhance_prompt: bool


JOB_TYPES: dict[str, JobTypePreset] = {
    "image_fast": JobTypePreset("image", 1, "fast", False),
    "image_high": JobTypePreset("image", 1, "high", False),
    "video_fast": JobTypePreset("video", 81, "fast", False),
    "video_high": JobTypePreset("video", 81, "high", False),
    "image7b_fast_enhanced": JobTypePreset("image", 1, "fast", True),
    "image7b_high_enhanced": JobTypePreset("image", 1, "high", True),
    "video7b_fast_enhanced": JobTypePreset("video", 81, "fast", True),
    "video7b_high_enhanced": JobTypePreset("video", 81, "high", True),
}
JobTypeName = Literal[tuple(JOB_TYPES)]  # type: ignore[valid-type]

#: What a reference image conditions: a subject (``single``), the first or the last frame.
ReferenceRole = Literal["single", "start", "end"]
ReferenceMode = Literal["none", "single", "start", "end", "both"]
#: The diffusers pipeline a job runs: text-to-video, VACE, or image-to-image (video-to-video on one frame).
Pipeline = Literal["t2v", "vace", "i2i"]
#: The model manager's pipelines: ``turbo`` is ``t2v`` on the distilled transformer.
ModelPipeline = Literal["t2v", "turbo", "vace", "i2i"]

# Documented ranges. Width/height must be multiples of 16 for the Wan VAE and patching.
DEFAULT_WIDTH, DEFAULT_HEIGHT = 480, 832
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 256, 1280, 16
DEFAULT_FPS, FPS_MIN, FPS_MAX = 16, 12, 24
FRAMES_MIN, FRAMES_MAX = 1, 121  # FRAMES_MAX: the single-pass limit
#: Long videos (made in VACE-continued segments, long_video.py): at most a minute.
DURATION_MIN_S, DURATION_MAX_S = 1.0, 60.0
LONG_FRAMES_MAX = FPS_MAX * 60 + 1  # the schema's bound; the job's own is fps * 60 + 1
OVERLAP_MIN, OVERLAP_MAX, DEFAULT_OVERLAP = 4, 40, 16
SEGMENT_PROMPTS_MAX = 64
STEPS_MIN, STEPS_MAX = 1, 100
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
SHIFT_MIN, SHIFT_MAX = 0.5, 20.0
DEFAULT_FLOW_SHIFT = 5.0
SEED_MAX = 2**32 - 1
PROMPT_MAX_CHARS = 2000

#: Default image-to-image strength when a reference is given without ``denoise_strength``.
DEFAULT_I2I_DENOISE = 0.7
#: Default VACE strength: denoise 0.5 maps to diffusers' default conditioning_scale 1.0.
DEFAULT_VACE_DENOISE = 0.5


def nearest_valid_frames(frames: int) -> int:
    """Nearest 4k+1 (Wan's VAE compresses time 4x); ties round down, so 83 -> 81."""
    lower = (frames - 1) // 4 * 4 + 1
    upper = lower + 4
    return lower if frames - lower <= upper - frames else upper


def conditioning_scale_for(denoise_strength: float) -> float:
    """VACE conditioning from denoise strength: ``2 * (1 - d)``.

    d = 1 regenerates freely (no conditioning), d = 0.5 is diffusers' default 1.0, and
    d = 0 holds the references twice as hard.
    """
    return round(2.0 * (1.0 - denoise_strength), 4)


def exact_copy_steps(denoise_strength: float) -> int:
    """Steps of the first implementation's exact-copy mode: ``min(max(6, int(d*100)), 10)``."""
    return min(max(6, int(denoise_strength * 100)), 10)
