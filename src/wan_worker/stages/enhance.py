"""Prompt enhancement with Qwen 2.5-7B: bounded in time, cached, and never fatal.

The Base model gets a plain completion prompt: the WAN system text (adapted to the
job type and quality), a few worked examples, then the user's prompt. An Instruct model
(``QWEN_MODEL`` naming one) gets the same text through its chat template. Only the new
tokens are decoded; generation stops at the example delimiter or EOS, is capped by
``max_new_tokens`` and bounded by transformers' own ``max_time`` criterion, which runs in
the caller's thread. Any failure returns the original prompt with the reason.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from wan_worker.contract.settings import Settings
from wan_worker.runtime.decoding import DELIMITER, generation_kwargs
from wan_worker.runtime.models import GiB, ModelManager

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """You are an expert AI prompt engineer specializing in WAN 2.1 {medium} generation{temporal}.

CRITICAL REQUIREMENTS:
- Target Model: WAN 2.1 T2V 1.3B ({target})
- Content Focus: {focus}
- Quality Priority: {priority}

ENHANCEMENT STRATEGY:
{strategy}

Write one paragraph in English, {length}. Keep every subject, object and action of the
original prompt. Output only the enhanced prompt."""

VIDEO = dict(
    medium="video",
    temporal=" and temporal consistency",
    target="motion-focused, 5-second videos",
    focus="Temporal consistency, smooth motion, cinematic quality",
    priority="Motion realism, scene coherence, professional cinematography",
    strategy="""1. MOTION FIRST: Describe natural, fluid movements and transitions
2. TEMPORAL CONSISTENCY: Ensure elements maintain coherence across frames
3. CINEMATOGRAPHY: Add professional camera work (smooth pans, steady shots)
4. SCENE SETTING: Establish clear environment and spatial relationships
5. TECHNICAL QUALITY: Video-specific quality terms (smooth motion, stable)""",
)
IMAGE = dict(
    medium="still image",
    temporal="",
    target="single-frame images",
    focus="Composition, lighting, detail, a single decisive moment",
    priority="Subject clarity, lighting, texture, professional photography",
    strategy="""1. SUBJECT FIRST: Describe the subject's appearance, pose and expression
2. COMPOSITION: Framing, viewpoint and depth of field
3. LIGHTING: Light sources, time of day and mood
4. SCENE SETTING: Establish clear environment and spatial relationships
5. TECHNICAL QUALITY: Sharp focus, fine detail, natural colors""",
)
LENGTH = {"fast": "about 150 tokens", "balanced": "about 200 tokens", "high": "about 250 tokens"}

EXAMPLES = (
    (
        "a cat on a windowsill",
        "A fluffy orange tabby cat sits on a sunlit wooden windowsill, tail swaying slowly as it watches birds "
        "outside. Soft morning light streams through the glass and drifts across its fur; the camera holds a "
        "steady medium shot, then gently pushes in as the cat turns its head and blinks. Consistent warm "
        "lighting, smooth natural motion, stable composition, shallow depth of field, cinematic quality.",
    ),
    (
        "city street at night in the rain",
        "A neon-lit city street at night in steady rain, reflections of pink and blue signs rippling across wet "
        "asphalt. Pedestrians with umbrellas walk past at an even pace while a taxi glides through the frame; "
        "the camera tracks slowly along the sidewalk at eye level. Coherent scene, consistent lighting, smooth "
        "fluid motion, fine raindrop detail, professional cinematography.",
    ),
)

_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can'?t|i cannot|i won'?t|as an ai)", re.IGNORECASE)


@dataclass
class Enhancement:
    original_prompt: str
    enhanced_prompt: str
    enhancement_applied: bool
    enhancement_source: str
    enhancement_time: float
    model: str
    cache_hit: bool = False
    reason: str | None = None
    new_tokens: int = 0
    model_was_loaded: bool = True


def system_text(job_type: str, quality: str) -> str:
    style = IMAGE if job_type.startswith("image") else VIDEO
    return SYSTEM_PROMPT.format(**style, length=LENGTH.get(quality, LENGTH["fast"]))


def completion_prompt(prompt: str, job_type: str, quality: str) -> str:
    """The Base model's few-shot completion prompt; the answer ends at ``DELIMITER``."""
    shots = "".join(f"Prompt: {src}\nEnhanced prompt: {dst}\n{DELIMITER}\n" for src, dst in EXAMPLES)
    return f"{system_text(job_type, quality)}\n{DELIMITER}\n{shots}Prompt: {prompt.strip()}\nEnhanced prompt:"


def clean_completion(text: str) -> str:
    """Cut at the delimiter, strip leftovers, and drop a trailing unfinished sentence."""
    text = text.split(DELIMITER, 1)[0]
    text = re.split(r"\n\s*(?:Prompt|Enhanced prompt):", text, maxsplit=1)[0]
    text = " ".join(text.split()).strip().strip('"').strip()
    if text and text[-1] not in ".!?" and "." in text:
        text = text[: text.rfind(".") + 1]
    return text


class Enhancer:
    def __init__(self, manager: ModelManager, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        self._cache: OrderedDict[tuple[str, str, str, str], str] = OrderedDict()
        self.cache_hits = 0

    @property
    def instruct(self) -> bool:
        return "instruct" in self.settings.qwen_model.lower()

    def enhance(self, prompt: str, job_type: str, quality: str) -> Enhancement:
        started = time.perf_counter()
        model_name = self.settings.qwen_model
        key = (prompt, job_type, quality, model_name)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return Enhancement(prompt, self._cache[key], True, "cache", time.perf_counter() - started, model_name, True)

        was_loaded = self.manager.qwen_loaded
        try:
            text, new_tokens, hit_time_bound = self._generate(prompt, job_type, quality)
        except Exception as exc:  # noqa: BLE001 - enhancement never fails the job
            if isinstance(exc, torch.OutOfMemoryError):
                self.manager.free_memory()
            log.warning("prompt enhancement failed", extra={"reason": f"{type(exc).__name__}: {exc}"})
            return self._fallback(prompt, started, f"error: {type(exc).__name__}", was_loaded)

        if hit_time_bound:
            return self._fallback(prompt, started, f"timeout after {self.settings.enhance_timeout_s:g}s", was_loaded)
        if len(text.split()) < 3:
            return self._fallback(prompt, started, "empty output", was_loaded)
        if _REFUSAL.match(text):
            return self._fallback(prompt, started, "refusal-like output", was_loaded)
        if self.settings.enhance_cache_size:
            self._cache[key] = text
            while len(self._cache) > self.settings.enhance_cache_size:
                self._cache.popitem(last=False)
        return Enhancement(
            prompt,
            text,
            True,
            "qwen_instruct" if self.instruct else "qwen_base",
            time.perf_counter() - started,
            model_name,
            new_tokens=new_tokens,
            model_was_loaded=was_loaded,
        )

    def _fallback(self, prompt: str, started: float, reason: str, was_loaded: bool) -> Enhancement:
        return Enhancement(
            prompt,
            prompt,
            False,
            "original",
            time.perf_counter() - started,
            self.settings.qwen_model,
            reason=reason,
            model_was_loaded=was_loaded,
        )

    def _generate(self, prompt: str, job_type: str, quality: str) -> tuple[str, int, bool]:
        model, tokenizer = self.manager.qwen()
        self.manager.acquire(["qwen"], working_bytes=GiB)
        if self.instruct:
            messages = [
                {"role": "system", "content": system_text(job_type, quality)},
                {"role": "user", "content": prompt.strip()},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = completion_prompt(prompt, job_type, quality)
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        budget = self.settings.enhance_timeout_s
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=self.settings.enhance_max_new_tokens,
                max_time=budget,
                **generation_kwargs(tokenizer),
            )
        elapsed = time.perf_counter() - started
        new = output[0, inputs["input_ids"].shape[1] :]
        decoded = tokenizer.decode(new, skip_special_tokens=True)
        return clean_completion(decoded), int(new.shape[0]), elapsed >= budget
