"""A job's observation points, for callers that time or inspect a job (the benchmark).

The stages call these at fixed points; the default does nothing, so an observer costs a
method call and never changes a job's result.
"""

from __future__ import annotations

import numpy as np


class JobObserver:
    """No-op hooks; subclass and override what you need."""

    def stage_started(self, name: str) -> None:
        """A progress stage began (``validating``, ``loading``, ``generating``, ``encoding`` ...)."""

    def text_encoded(self) -> None:
        """The prompt embeddings are ready; denoising starts next."""

    def step_finished(self, step: int, total: int) -> None:
        """Denoising step ``step`` of ``total`` finished (1-based)."""

    def frames_decoded(self, frames: np.ndarray) -> None:
        """A single-pass job's decoded frames, (F, H, W, 3) uint8, before the encode stage finishes them."""


NO_OBSERVER = JobObserver()
