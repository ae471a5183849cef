"""The segment plan of a long video, and what it will cost before it starts.

A clip longer than one pass is made of segments of at most ``SEGMENT_FRAMES`` (4k+1)
frames. Segment 1 makes its frames from the prompt; every later segment is a VACE job
whose first ``kept`` frames are the previous segment's last decoded frames (kept by the
mask), so it only adds ``frames - kept`` new ones. The clip's length is therefore

    N = L1 + sum(Li - Ki for i >= 2)

Every ``Li`` must be 4k+1, so with a fixed overlap K not every N is reachable. The plan
keeps K for every seam but the last, whose overlap may grow by up to 3 frames (more
context, never less) to land on N exactly.

Search (``plan_segments``): for n = 2, 3, ... segments, try the first n-1 segments at one
length L, shortest first, and give the last the remainder R = N - L - (n-2)(L-K):
its length is the smallest 4k+1 >= R + K, its overlap that length minus R. The first
(n, L) where the last segment is no longer than L and adds at least one frame wins: the
fewest segments, with lengths as even as the 4k+1 grid allows. With L = SEGMENT_FRAMES
the remainder takes every value in [1, L - K] as n grows, so every N has a plan whenever a
segment has room for K + 1 frames.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Each segment adds at least this many new frames. One is enough for every count to be
#: reachable: the last segment's remainder then covers every residue.
MIN_NEW_FRAMES = 1


@dataclass(frozen=True)
class Segment:
    index: int
    frames: int  # frames the segment generates, 4k+1
    kept: int  # leading frames kept from the previous segment (0 for the first)

    @property
    def new(self) -> int:
        return self.frames - self.kept


def _ceil_4k1(frames: int) -> int:
    return frames + (1 - frames) % 4


def plan_segments(total: int, overlap: int, max_frames: int) -> list[Segment]:
    """Segments whose new frames add up to exactly ``total`` (see the module docstring)."""
    if total <= max_frames and total % 4 == 1:
        return [Segment(0, total, 0)]
    lengths = range(_ceil_4k1(overlap + MIN_NEW_FRAMES), max_frames + 1, 4)
    for n in range(2, total // MIN_NEW_FRAMES + 2):
        for length in lengths:
            rest = total - length - (n - 2) * (length - overlap)
            if rest < MIN_NEW_FRAMES:
                break  # longer segments only leave less for the last one
            last = _ceil_4k1(rest + overlap)
            if last <= length:
                middle = [Segment(i, length, overlap) for i in range(1, n - 1)]
                return [Segment(0, length, 0), *middle, Segment(n - 1, last, last - rest)]
    raise ValueError(f"no segment plan for {total} frames with overlap {overlap} and segments of {max_frames}")


def latent_tokens(width: int, height: int, frames: int) -> int:
    """Transformer tokens per forward: 4x time and 8x space VAE compression, 2x2 patches."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


#: Seconds per transformer token-forward and per decoded pixel-frame before any job has
#: measured them. Conservative: about 1.6x an H100's measured 1.9e-5 s per token-forward at
#: 480x832x81 (0.62 s a forward), VACE 1.5x that for its extra context blocks, and 3e-7 s per
#: pixel-frame for the VAE (measured 1.1-2.2e-7). A full model on a CPU costs ~1e-3 per
#: token-forward. The tiny test profile is cheap on any device (measured ~2e-6 on a CPU core).
DEFAULT_COSTS: dict[str, tuple[float, float]] = {
    "cuda": (3e-5, 3e-7),
    "cpu": (1e-3, 1e-5),
    "tiny": (2e-5, 2e-7),
}
VACE_COST_FACTOR = 1.5
#: Headroom on estimates: a job is refused only when it clearly cannot finish.
ESTIMATE_MARGIN = 1.1


class CostModel:
    """Per-step and per-frame costs, measured on this worker's own jobs (latest wins).

    ``record`` takes every finished generation, single-pass ones included, so the first long
    video usually starts from measured numbers rather than the defaults.
    """

    def __init__(self, device_type: str, profile: str) -> None:
        key = "tiny" if profile == "tiny" else ("cuda" if device_type == "cuda" else "cpu")
        step, decode = DEFAULT_COSTS[key]
        self._step: dict[str, float] = {}
        self._default_step = step
        self.decode = decode
        self.measured = False

    def record(self, pipeline: str, width: int, height: int, frames: int, forwards: int, timings: dict) -> None:
        """``forwards``: transformer forwards the denoising ran (steps x 2 with guidance)."""
        if pipeline not in ("t2v", "vace") or forwards <= 0:
            return
        denoise, decode = timings.get("denoising"), timings.get("vae_decode")
        if denoise:
            self._step[pipeline] = denoise / (forwards * latent_tokens(width, height, frames))
            self.measured = True
        if decode:
            self.decode = decode / (frames * width * height)

    def step_cost(self, pipeline: str) -> float:
        if pipeline in self._step:
            return self._step[pipeline]
        if pipeline == "vace":
            return self._step.get("t2v", self._default_step) * VACE_COST_FACTOR
        return self._step["vace"] / VACE_COST_FACTOR if "vace" in self._step else self._default_step

    def seconds(self, pipeline: str, width: int, height: int, frames: int, forwards: int) -> float:
        """Estimated denoise + decode seconds of one generation."""
        tokens = latent_tokens(width, height, frames)
        return self.step_cost(pipeline) * tokens * forwards + self.decode * frames * width * height
