"""In-process workers on the tiny profile, and small jobs of each kind for them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image

from wan_worker.infra.local_s3 import ACCESS_KEY as S3_KEY
from wan_worker.infra.local_s3 import BUCKET, S3Server
from wan_worker.infra.local_s3 import SECRET_KEY as S3_SECRET

#: A small, fast job of each kind for in-process runs (256x256, 1-2 steps, 5 frames).
SMALL_VIDEO = {
    "job_type": "video_fast",
    "prompt": "a small test video",
    "width": 256,
    "height": 256,
    "frame_num": 5,
    "seed": 3,
    "config": {"num_inference_steps": 2},
}
SMALL_IMAGE = {
    "job_type": "image_fast",
    "prompt": "a small test image",
    "width": 256,
    "height": 256,
    "seed": 3,
    "config": {"num_inference_steps": 1},
}


def tiny_settings(tiny_models: Path, **overrides: Any):
    """In-process ``Settings`` for the tiny profile (no environment read beyond defaults)."""
    from wan_worker.contract.settings import Settings

    values: dict[str, Any] = dict(
        model_profile="tiny", tiny_models_dir=tiny_models, allow_private_reference_urls=True, upload_attempts=2
    )
    values.update(overrides)
    return Settings(**values)


def s3_settings(server: S3Server, endpoint: str | None = None) -> dict[str, Any]:
    """The ``Settings`` fields of the test S3 server (or of a proxy in front of it, ``endpoint``)."""
    return dict(
        bucket_endpoint_url=endpoint or server.endpoint,
        bucket_access_key_id=S3_KEY,
        bucket_secret_access_key=S3_SECRET,
        bucket_name=BUCKET,
    )


def tiny_worker(tiny_models: Path, **overrides: Any):
    """An in-process ``Worker`` on the tiny profile (``tiny_settings`` + overrides)."""
    from wan_worker.serving.worker import Worker

    return Worker(tiny_settings(tiny_models, **overrides))


def handle(worker, job_input: Any, job_id: str = "local", progress: list | None = None) -> dict:
    """One job through ``Worker.handle`` as RunPod would call it; progress payloads are kept."""
    sent = progress if progress is not None else []
    return worker.handle({"id": job_id, "input": job_input}, send=sent.append)


def png_data_uri(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
