"""Encoding generated frames: MP4 (H.264, yuv420p, faststart), PNG, and WEBP thumbnails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

THUMB_EDGE = 256
THUMB_QUALITY = 85


@dataclass(frozen=True)
class EncodedMedia:
    path: Path
    thumbnail_path: Path
    format: str  # "mp4" | "png"
    content_type: str
    width: int
    height: int
    frames: int
    fps: int | None
    duration_seconds: float


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] -> uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_video(frames: np.ndarray, path: Path, fps: int) -> None:
    """H.264 in yuv420p with the moov atom first, so browsers start playing before the end."""
    import imageio.v2 as imageio

    with imageio.get_writer(
        path,
        fps=fps,
        codec="libx264",
        quality=None,
        pixelformat="yuv420p",
        macro_block_size=16,
        ffmpeg_log_level="error",
        output_params=["-crf", "18", "-preset", "medium", "-movflags", "+faststart"],
    ) as writer:
        for frame in frames:
            writer.append_data(frame)


def write_thumbnail(frame: np.ndarray, path: Path) -> None:
    """Longest edge 256 px, aspect kept, WEBP quality 85."""
    image = Image.fromarray(frame)
    image.thumbnail((THUMB_EDGE, THUMB_EDGE), Image.Resampling.LANCZOS)
    image.save(path, format="WEBP", quality=THUMB_QUALITY)


def encode(frames: np.ndarray, out_dir: Path, *, as_video: bool, fps: int) -> EncodedMedia:
    """Write the asset and its mid-frame thumbnail into ``out_dir``."""
    frames = to_uint8(frames)
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    thumb = out_dir / "0.thumb.webp"
    write_thumbnail(frames[count // 2], thumb)
    if as_video:
        path = out_dir / "0.mp4"
        write_video(frames, path, fps)
        return EncodedMedia(path, thumb, "mp4", "video/mp4", width, height, count, fps, round(count / fps, 4))
    path = out_dir / "0.png"
    Image.fromarray(frames[0]).save(path, format="PNG")
    return EncodedMedia(path, thumb, "png", "image/png", width, height, 1, None, 0.0)
