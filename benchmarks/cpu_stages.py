"""Section ``cpu_stages``: MP4 + thumbnail + upload on the decoded frames and on a
natural-looking clip, per x264 preset, with the encoded video's PSNR."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .context import Context
from .harness import natural_clip, now, psnr, r


def encode_at_preset(frames: np.ndarray, out_dir: Path, preset: str):
    """The worker's ``media.encode`` at its own x264 preset. Another preset is not a setting of
    the worker, so that one is written here with the worker's other x264 parameters (CRF,
    pixel format, faststart) and its thumbnail writer: the comparison the preset choice needs."""
    from wan_worker.stages import media

    if preset == media.X264_PRESET:
        return media.encode(frames, out_dir, as_video=True, fps=16)
    import imageio.v2 as imageio

    path, thumb = out_dir / "0.mp4", out_dir / "0.thumb.webp"
    with imageio.get_writer(
        path,
        fps=16,
        codec="libx264",
        quality=None,
        pixelformat="yuv420p",
        macro_block_size=16,
        ffmpeg_log_level="error",
        output_params=["-crf", str(media.X264_CRF), "-preset", preset, "-movflags", "+faststart"],
    ) as writer:
        for frame in frames:
            writer.append_data(media.to_uint8(frame))
    media.check_mp4(path)
    media.write_thumbnail(frames[len(frames) // 2], thumb)
    height, width = frames.shape[1:3]
    return media.EncodedMedia(path, thumb, "mp4", "video/mp4", width, height, len(frames), 16, len(frames) / 16)


def cpu_stages(ctx: Context) -> dict[str, Any]:
    """MP4 + thumbnail + upload, per x264 preset, on the decoded frames and on natural footage."""
    import imageio.v2 as imageio

    from wan_worker.stages import media
    from wan_worker.stages.storage import Storage

    storage = ctx.worker.storage if ctx.worker is not None else Storage(ctx.settings())
    clips = {"natural_clip": natural_clip(ctx.frames, ctx.height, ctx.width)}
    if ctx.frames_worker is not None:
        clips["decoded_frames"] = ctx.frames_worker
    presets = ctx.args.x264_presets.split(",")
    results: dict[str, Any] = {
        "upload_target": "seaweedfs" if ctx.s3 else "inline (no S3 server)",
        "cpu_count": os.cpu_count(),
        "worker_preset": media.X264_PRESET,
    }
    for clip_name, frames in clips.items():
        for preset in presets:
            runs = []
            for rep in range(2):
                with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
                    t = now()
                    enc = encode_at_preset(frames, Path(tmp), preset)
                    t_enc = now() - t
                    t = now()
                    key = f"bench/{clip_name}-{preset}-{rep}"
                    storage.store(
                        [
                            (enc.path, f"{key}/0.mp4", enc.content_type),
                            (enc.thumbnail_path, f"{key}/0.thumb.webp", "image/webp"),
                        ]
                    )
                    t_up = now() - t
                    size = enc.path.stat().st_size
                    quality = None
                    if rep == 0:
                        decoded = np.stack([f for f in imageio.get_reader(enc.path)])
                        quality = psnr(decoded, media.to_uint8(frames))
                runs.append((t_enc, t_up, size, quality))
            t_enc, t_up, size, quality = runs[-1]
            results[f"{clip_name}/{preset}"] = {
                "encode_s": r(t_enc),
                "upload_s": r(t_up),
                "total_s": r(t_enc + t_up),
                "mp4_bytes": size,
                "mp4_psnr_db": runs[0][3],
            }
    return results
