"""Encoding generated frames: MP4 (H.264, yuv420p, faststart), PNG, and WEBP thumbnails.

The CPU stages overlap the GPU: a video's frames reach the MP4 while the VAE is still
decoding the rest (``VideoStream`` feeds ffmpeg from its own thread), and the thumbnail is
made in a thread while the MP4 is finished.
"""

from __future__ import annotations

import errno
import io
import queue
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

THUMB_EDGE = 256
THUMB_QUALITY = 85
#: x264 settings: CRF 18 keeps the picture visually lossless; the preset trades encode time
#: for bitrate at that quality (docs/PERFORMANCE.md has the measured trade-off).
X264_CRF = 18
X264_PRESET = "medium"


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
    """(..., 3) float in [0, 1] -> uint8, rounding to nearest. uint8 input passes through."""
    if frames.dtype == np.uint8:
        return frames
    out = np.multiply(frames, 255.0, dtype=np.float32)
    out += 0.5
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def _video_writer(path: Path, fps: int):
    """H.264 in yuv420p with the moov atom first, so browsers start playing before the end."""
    import imageio.v2 as imageio

    return imageio.get_writer(
        path,
        fps=fps,
        codec="libx264",
        quality=None,
        pixelformat="yuv420p",
        macro_block_size=16,
        ffmpeg_log_level="error",
        output_params=["-crf", str(X264_CRF), "-preset", X264_PRESET, "-movflags", "+faststart"],
    )


class VideoStream:
    """An MP4 written piece by piece without making the caller wait: ``append`` only queues
    the frames, and a writer thread hands them to ffmpeg. So the VAE goes on decoding a clip,
    or a long video goes on to its next segment, while the encoder works; only what is
    queued is held. Errors surface at ``close``, which finishes and checks the file."""

    def __init__(self, path: Path, fps: int) -> None:
        self.path = path
        self.frames = 0
        self._writer = _video_writer(path, fps)
        self._queue: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mp4-writer", daemon=True)
        self._thread.start()

    def append(self, frames: np.ndarray) -> None:
        """Queue (F, H, W, 3) frames, uint8 or float in [0, 1]."""
        self._queue.put(frames)
        self.frames += len(frames)

    def _drain(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so nothing waits on a dead encoder
            try:
                for frame in frames:
                    self._writer.append_data(to_uint8(frame))
            except BaseException as exc:  # noqa: BLE001 - re-raised by close()
                self._error = exc

    def _stop_writer_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop_writer_thread()
        if self._error is not None:
            self.abort()
            if _disk_full(self.path):
                raise _no_space(self.path)
            raise self._error
        self._writer.close()
        check_mp4(self.path)

    def abort(self) -> None:
        """Stop ffmpeg after a failure; the partial file is the caller's to delete."""
        self._stop_writer_thread()
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the job has already failed for a better reason
            pass


def _disk_full(path: Path) -> bool:
    return shutil.disk_usage(path.parent).free < 1024 * 1024


def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device: ffmpeg could not finish the MP4", str(path))


def check_mp4(path: Path) -> None:
    """Refuse an incomplete MP4. imageio drops ffmpeg's exit status, so a disk that fills up
    while the video is written leaves a truncated file that would otherwise be uploaded as
    the result. The top-level boxes must hold ``moov`` and ``mdat`` and end exactly at EOF.
    """
    size = path.stat().st_size if path.exists() else 0
    kinds, pos = set(), 0
    with path.open("rb") if size else io.BytesIO() as f:
        while pos + 8 <= size:
            f.seek(pos)
            header = f.read(16)
            box_size, kind = struct.unpack(">I4s", header[:8])
            if box_size == 1:
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:
                box_size = size - pos
            if box_size < 8:
                break
            kinds.add(kind)
            pos += box_size
    if pos == size and {b"moov", b"mdat"} <= kinds:
        return
    if _disk_full(path):
        raise _no_space(path)
    raise RuntimeError(f"ffmpeg wrote an incomplete MP4 ({path.name}, {size} bytes)")


def write_thumbnail(frame: np.ndarray, path: Path) -> None:
    """Longest edge 256 px, aspect kept, WEBP quality 85."""
    image = Image.fromarray(to_uint8(frame))
    image.thumbnail((THUMB_EDGE, THUMB_EDGE), Image.Resampling.LANCZOS)
    image.save(path, format="WEBP", quality=THUMB_QUALITY)


def encode(
    frames: np.ndarray, out_dir: Path, *, as_video: bool, fps: int, stream: VideoStream | None = None
) -> EncodedMedia:
    """Write the asset and its mid-frame thumbnail into ``out_dir``. A video whose frames
    already went into ``stream`` while they were decoded is only finished here."""
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    thumb = out_dir / "0.thumb.webp"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="thumbnail") as pool:
        thumb_done = pool.submit(write_thumbnail, frames[count // 2], thumb)
        if as_video:
            if stream is None:
                stream = VideoStream(out_dir / "0.mp4", fps)
                stream.append(frames)
            stream.close()
            result = EncodedMedia(
                stream.path, thumb, "mp4", "video/mp4", width, height, count, fps, round(count / fps, 4)
            )
        else:
            path = out_dir / "0.png"
            Image.fromarray(to_uint8(frames[0])).save(path, format="PNG")
            result = EncodedMedia(path, thumb, "png", "image/png", width, height, 1, None, 0.0)
        thumb_done.result()  # re-raises a thumbnail failure
    return result
