"""Joining VACE-continued segments without a visible seam, and measuring the seams.

* ``match_colour``: a new segment drifts in colour from the frames it continues. Its
  per-channel mean/std over the overlap frames are mapped onto the kept frames' and the
  same affine map is applied to all its frames.
* ``crossfade``: across the overlap, the kept frames fade linearly into the new ones.
* ``SeamMeter``: frame-to-frame mean absolute difference of the written clip; a seam's
  ratio is its largest difference divided by the median difference inside the segments.
  Above ``SEAM_JUMP_RATIO`` the job's metrics log line carries the ``seam_jump`` flag.
"""

from __future__ import annotations

import numpy as np

SEAM_JUMP_RATIO = 3.0
#: Limits on the colour-match gain, so a flat overlap (std near 0) cannot blow a segment up.
GAIN_MIN, GAIN_MAX = 0.5, 2.0
#: Floor of the median difference (in 8-bit levels) so a still clip does not divide by ~0.
MEDIAN_FLOOR = 0.5


def _stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = frames.reshape(-1, frames.shape[-1]).astype(np.float64)
    return pixels.mean(axis=0), pixels.std(axis=0)


def match_colour(frames: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Map ``frames``' (F, H, W, 3 float in [0, 1]) colour statistics over their first
    ``len(kept)`` frames onto ``kept``'s (uint8), in place; returns ``frames``."""
    src_mean, src_std = _stats(frames[: len(kept)])
    dst_mean, dst_std = _stats(kept.astype(np.float32) / 255.0)
    gain = np.clip(dst_std / np.maximum(src_std, 1e-6), GAIN_MIN, GAIN_MAX)
    offset = dst_mean - src_mean * gain
    frames *= gain.astype(np.float32)
    frames += offset.astype(np.float32)
    np.clip(frames, 0.0, 1.0, out=frames)
    return frames


def crossfade(kept: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Blend ``kept`` (K frames, uint8) into ``head`` (K frames, float [0, 1]) linearly:
    frame j is ``(j+1)/(K+1)`` new, so the first leans on the old and the last on the new."""
    k = len(kept)
    weights = (np.arange(1, k + 1, dtype=np.float32) / (k + 1)).reshape(k, 1, 1, 1)
    return kept.astype(np.float32) / 255.0 * (1.0 - weights) + head * weights


class SeamMeter:
    """Frame-to-frame differences of the clip as it is written, and where the seams are."""

    def __init__(self) -> None:
        self.diffs: list[float] = []
        self.frames = 0
        self._previous: np.ndarray | None = None
        self._seams: list[tuple[int, int]] = []

    def add(self, frames: np.ndarray) -> None:
        """Append uint8 frames (F, H, W, 3) in clip order."""
        for frame in frames:
            current = frame.astype(np.int16)
            if self._previous is not None:
                self.diffs.append(float(np.abs(current - self._previous).mean()))
            self._previous = current
            self.frames += 1

    def mark_seam(self, start: int, length: int) -> None:
        """The overlap frames ``[start, start+length)`` of the clip are a seam: the
        differences from the frame before it to the frame after it belong to it."""
        self._seams.append((start, length))

    def report(self) -> tuple[list[dict], float | None]:
        """Per seam: its first frame, largest difference and ratio to the inside median."""
        windows = [range(max(start - 1, 0), min(start + length, len(self.diffs))) for start, length in self._seams]
        in_seam = {i for w in windows for i in w}
        inside = [d for i, d in enumerate(self.diffs) if i not in in_seam]
        median = max(float(np.median(inside)) if inside else MEDIAN_FLOOR, MEDIAN_FLOOR)
        seams = []
        for (start, length), window in zip(self._seams, windows, strict=True):
            jump = max((self.diffs[i] for i in window), default=0.0)
            seams.append({"frame": start, "overlap": length, "diff": round(jump, 3), "ratio": round(jump / median, 3)})
        return seams, max((s["ratio"] for s in seams), default=None)
