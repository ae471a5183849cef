"""Run one job's diffusion on the resident models: prompt encoding, denoising, VAE decode.

The pipeline per job:

* ``t2v``  - ``WanPipeline``: text to video, or to one frame for image job types.
* ``turbo`` - the same ``WanPipeline`` on the DMD-distilled transformer (``quality: "turbo"``).
* ``vace`` - ``WanVACEPipeline``: ``reference_images=[img]`` for a subject reference, or a
  ``video`` + ``mask`` that keep the given first/last frame(s) (white = generate).
* ``i2i``  - ``WanVideoToVideoPipeline`` on a one-frame video with ``strength``.

Steps report progress and check the job deadline; past it, the pipeline's own interrupt
flag stops the loop at the next step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from wan_worker.contract import presets as P
from wan_worker.contract.errors import JobTimeout
from wan_worker.contract.jobs import Job
from wan_worker.contract.settings import Settings
from wan_worker.runtime.accel import step_cache
from wan_worker.runtime.loras import LoraRuntime
from wan_worker.runtime.models import ModelManager, estimate_working_bytes
from wan_worker.stages.progress import Progress

GRAY, BLACK, WHITE = (128, 128, 128), (0, 0, 0), (255, 255, 255)
MAX_SEQUENCE_LENGTH = 512
#: UMT5-XXL activations for 512 tokens are ~100 MB; this leaves room for the allocator.
ENCODER_WORKING_BYTES = 512 * 1024**2


@dataclass
class Conditioning:
    """What the chosen pipeline receives beyond the prompt (recorded for the output and tests)."""

    pipeline: P.Pipeline
    kwargs: dict[str, Any] = field(default_factory=dict)
    conditioning_scale: float | None = None
    denoise_strength: float | None = None

    def summary(self) -> dict[str, Any] | None:
        """What conditioned the output, in numbers a caller can check (asset metadata)."""
        if self.pipeline == "vace":
            mask = self.kwargs.get("mask") or []
            return {
                "reference_images": len(self.kwargs.get("reference_images") or []),
                "kept_frames": [i for i, m in enumerate(mask) if m.getpixel((0, 0)) == BLACK],
            }
        if self.pipeline == "i2i":
            return {"input_frames": len(self.kwargs["video"]), "strength": self.kwargs["strength"]}
        return None


@dataclass
class Generated:
    frames: np.ndarray  # (F, H, W, 3) uint8
    steps_run: int
    step_cache_threshold: float | None
    timings: dict[str, float]
    #: The timesteps the transformer ran at (DMD's fixed schedule), None for UniPC.
    timesteps: list[int] | None = None


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) decoder output in [-1, 1] -> (F, H, W, C) uint8 on the same device, rounded
    to nearest. Converting on the GPU copies a quarter of the bytes float32 frames would."""
    scaled = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5
    return scaled.to(torch.uint8).permute(1, 2, 3, 0)


class DecodedFrames:
    """The decoded video, collected as uint8 while the VAE decodes it.

    Wan's VAE decodes causally, one latent frame (1, then 4 video frames) per call of its
    decoder. A forward hook on the decoder converts each piece as it comes and hands it to
    ``sink`` (the MP4 stream), so ffmpeg encodes while the GPU is still decoding. On a GPU the
    piece goes to pinned host memory asynchronously and is handed on, in order, once its copy
    has finished: a synchronous copy would stall the GPU at each piece until the host had
    queued the next piece's kernels. A tiled or patchified VAE decodes pieces that are not
    whole frames; then the frames come from the pipeline's output at the end, in the same
    conversion.
    """

    def __init__(self, sink: Callable[[np.ndarray], None] | None) -> None:
        self.sink = sink
        self.chunks: list[np.ndarray] = []
        self._copying: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    @contextlib.contextmanager
    def hooked(self, vae) -> Iterator[None]:
        if vae.use_tiling or vae.config.get("patch_size") is not None:
            yield
            return
        handle = vae.decoder.register_forward_hook(lambda _module, _args, out: self._add(out[0]))
        try:
            yield
        finally:
            handle.remove()

    def _add(self, video: torch.Tensor) -> None:
        frames, copied = to_uint8_frames(video), None
        if frames.is_cuda:
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(frames.device))  # the stream the copy went on
            frames = host
        self._copying.append((frames, copied))
        self._hand_on(wait=False)

    def _hand_on(self, wait: bool) -> None:
        """Pass on, in order, the pieces whose copy to the host has finished (with ``wait``, all)."""
        while self._copying:
            frames, copied = self._copying[0]
            if copied is not None:
                if not wait and not copied.query():
                    return
                copied.synchronize()  # returns at once after a query() that said done
            self._copying.pop(0)
            chunk = frames.numpy()
            self.chunks.append(chunk)
            if self.sink is not None:
                self.sink(chunk)

    def frames(self, output: torch.Tensor) -> np.ndarray:
        """All frames; ``output`` is the pipeline's (F, C, H, W) in [0, 1], used when nothing streamed."""
        if not self.chunks and not self._copying:
            self._add(output.permute(1, 0, 2, 3) * 2.0 - 1.0)
        self._hand_on(wait=True)
        return np.concatenate(self.chunks)


def vace_inputs(mode: str, images: dict[str, Image.Image], num_frames: int, size: tuple[int, int]) -> dict[str, Any]:
    """The VACE ``video``/``mask``/``reference_images`` for a reference mode."""
    if mode == "single":
        return {"reference_images": [images["single"]]}
    gray, black, white = (Image.new("RGB", size, c) for c in (GRAY, BLACK, WHITE))
    video = [gray] * num_frames
    mask = [white] * num_frames
    if mode in ("start", "both"):
        video[0], mask[0] = images["start"], black
    if mode in ("end", "both"):
        video[-1], mask[-1] = images["end"], black
    return {"video": video, "mask": mask}


def i2i_schedule(steps: int, strength: float) -> tuple[int, float, int]:
    """(scheduler steps, strength to pass, steps that actually run) for image-to-image.

    diffusers runs the last ``int(steps * strength)`` steps of the schedule. When that is 0
    (exact-copy strengths like 0.05 with 6-10 steps, or strength 0), the schedule is
    stretched so exactly one step runs at the lowest noise level, instead of crashing on an
    empty schedule.
    """
    run = int(steps * strength)
    if run >= 1:
        return steps, strength, run
    stretched = min(1000, math.ceil(1.0 / max(strength, 1e-3)))
    return stretched, 1.0 / stretched + 1e-9, 1


def build_conditioning(job: Job, mode: str, images: dict[str, Image.Image]) -> Conditioning:
    if mode == "none":
        return Conditioning("t2v")
    if job.kind == "image":
        image = next(iter(images.values()))
        return Conditioning("i2i", {"video": [image], "strength": job.denoise_strength}, None, job.denoise_strength)
    scale = P.conditioning_scale_for(job.denoise_strength)
    kwargs = vace_inputs(mode, images, job.num_frames, (job.width, job.height))
    kwargs["conditioning_scale"] = scale
    return Conditioning("vace", kwargs, scale, job.denoise_strength)


def model_pipeline(job: Job, cond: Conditioning) -> P.ModelPipeline:
    """The model manager's pipeline for a job: turbo swaps the text-to-video transformer."""
    return "turbo" if cond.pipeline == "t2v" and job.quality == "turbo" else cond.pipeline


def cache_threshold(job: Job, pipeline: str, settings: Settings) -> float | None:
    """``auto`` caches for presets that allow it; ``high`` never caches, whatever is asked.

    diffusers' video-to-video pipeline runs its denoiser outside a ``cache_context``, which
    the first-block cache needs, so image-to-image (a few steps anyway) is never cached.
    Neither is DMD: each of its few steps starts from fresh noise, so no step repeats another.
    """
    if job.quality == "high" or job.step_cache == "off" or pipeline == "i2i" or job.sampler == "dmd":
        return None
    if job.step_cache == "on" or P.QUALITY_PRESETS[job.quality].step_cache:
        return settings.step_cache_threshold or None
    return None


class Generator:
    def __init__(self, manager: ModelManager, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        self.loras = LoraRuntime(manager, settings)

    def missing(self, names: list[str]) -> list[str]:
        """The pipelines among ``names`` that are not loaded yet, each once."""
        return [name for name in dict.fromkeys(names) if not self.manager.ready(name)]

    def load(self, names: list[str]) -> float:
        """Load the pipelines that are not resident yet (the only loading a job does); seconds taken."""
        started = time.perf_counter()
        missing = self.missing(names)
        if missing:  # the base model (UMT5 included) first: every job encodes its prompt with it
            self.manager.encoder_pipe()
        for name in missing:
            self.manager.pipeline(name)
        return time.perf_counter() - started

    def encode_prompt(self, job: Job, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.manager.acquire(["text_encoder"], working_bytes=ENCODER_WORKING_BYTES)
        encoder = self.manager.encoder_pipe()
        with torch.inference_mode():
            positive, negative = encoder.encode_prompt(
                prompt=prompt,
                negative_prompt=job.negative_prompt,
                do_classifier_free_guidance=job.guidance_scale > 1.0,
                num_videos_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                device=self.manager.device,
                dtype=torch.bfloat16,
            )
        return positive, negative

    def generate(
        self,
        job: Job,
        prompt: str,
        cond: Conditioning,
        progress: Progress,
        deadline: float,
        sink: Callable[[np.ndarray], None] | None = None,
    ) -> Generated:
        """Encode the prompt, denoise and decode; ``sink`` receives the uint8 frames while they
        are decoded."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        prompt_embeds, negative_embeds = self.encode_prompt(job, prompt)
        timings["text_encoding"] = time.perf_counter() - started
        progress.observer.text_encoded()

        name = model_pipeline(job, cond)
        pipe = self.manager.pipeline(name)
        transformer_name = {"vace": "vace_transformer", "turbo": "turbo_transformer"}.get(name, "transformer")
        self.manager.acquire(
            [transformer_name, "vae"], working_bytes=estimate_working_bytes(job.width, job.height, job.num_frames)
        )
        generator = torch.Generator(device=self.manager.device).manual_seed(job.seed)
        # From the checkpoint's own scheduler config: a pipeline's current scheduler may be DMD's.
        pipe.scheduler = scheduler_for(job, self.manager.encoder_pipe().scheduler.config, generator)

        kwargs = dict(cond.kwargs)
        steps = len(pipe.scheduler.fixed_timesteps) if job.sampler == "dmd" else job.steps
        if cond.pipeline == "i2i":
            steps, kwargs["strength"], _ = i2i_schedule(job.steps, kwargs["strength"])
        else:
            kwargs["num_frames"] = job.num_frames

        state = {"last_step_at": None}

        def on_step(p, i: int, t, callback_kwargs: dict) -> dict:
            state["last_step_at"] = time.perf_counter()
            progress.step(i + 1, p.num_timesteps)
            if time.monotonic() > deadline:
                p._interrupt = True  # the pipeline skips the remaining steps
                # ... and raising here also skips the VAE decode of a half-denoised video, which
                # alone can take longer than all the steps: JOB_TIMEOUT_S bounds the whole job.
                raise JobTimeout(f"job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:g}s during generation")
            return {}

        threshold = cache_threshold(job, cond.pipeline, self.settings)
        decoded = DecodedFrames(sink)
        with (
            self.loras.applied(pipe.transformer, job) as lora_switch,
            torch.inference_mode(),
            step_cache(pipe.transformer, threshold),
            decoded.hooked(pipe.vae),
        ):
            if lora_switch is not None:
                timings["lora_switch"] = lora_switch
            denoise_started = time.perf_counter()
            result = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                height=job.height,
                width=job.width,
                num_inference_steps=steps,
                guidance_scale=job.guidance_scale,
                generator=generator,
                output_type="pt",
                callback_on_step_end=on_step,
                **kwargs,
            )
            frames = decoded.frames(result.frames[0])
        finished = time.perf_counter()
        last_step = state["last_step_at"] or finished
        timings["denoising"] = last_step - denoise_started
        timings["vae_decode"] = finished - last_step
        timesteps = [int(t) for t in pipe.scheduler.timesteps] if job.sampler == "dmd" else None
        return Generated(frames, pipe.num_timesteps, threshold, timings, timesteps)


def scheduler_for(job: Job, base_config: Any, generator: torch.Generator):
    """UniPC at the job's flow shift, or DMD on the job's timesteps re-noising from ``generator``."""
    if job.sampler == "dmd":
        from wan_worker.runtime.dmd import DMDScheduler

        return DMDScheduler.for_schedule(job.timesteps or P.TURBO_TIMESTEPS, job.flow_shift, generator)
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(base_config, flow_shift=job.flow_shift)
