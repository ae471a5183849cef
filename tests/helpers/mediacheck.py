"""Inspect produced media for real: container boxes, codec, pixel format, frames, fps."""

from __future__ import annotations

import io
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
from PIL import Image


def top_level_boxes(data: bytes) -> list[str]:
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return boxes


@dataclass
class VideoInfo:
    codec: str
    pix_fmt: str
    fps: float
    frames: int
    width: int
    height: int
    faststart: bool


def probe_video(data: bytes, tmp: Path) -> VideoInfo:
    path = tmp / "probe.mp4"
    path.write_bytes(data)
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    text = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    stream = re.search(r"Video: (\w+).*?, (\w+)\(?.*?, (\d+)x(\d+).*?, ([\d.]+) fps", text)
    assert stream, text
    frames = sum(1 for _ in imageio.get_reader(path, format="ffmpeg"))
    boxes = top_level_boxes(data)
    return VideoInfo(
        codec=stream.group(1),
        pix_fmt=stream.group(2),
        width=int(stream.group(3)),
        height=int(stream.group(4)),
        fps=float(stream.group(5)),
        frames=frames,
        faststart="moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"),
    )


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
