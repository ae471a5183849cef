"""Unit tests of the small modules: media, storage, progress, settings, logs."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import requests
from helpers.mediacheck import probe_video
from PIL import Image

from wan_worker.contract.errors import StorageError
from wan_worker.contract.settings import Settings
from wan_worker.infra import logs
from wan_worker.stages.media import encode
from wan_worker.stages.progress import Progress
from wan_worker.stages.storage import Storage


def frames(count: int, h: int = 64, w: int = 96) -> np.ndarray:
    ramp = np.linspace(0, 1, count, dtype=np.float32)[:, None, None, None]
    return np.broadcast_to(ramp, (count, h, w, 3)).copy()


def test_video_encoding_is_web_ready(tmp_path):
    media = encode(frames(17), tmp_path, as_video=True, fps=16)
    info = probe_video(media.path.read_bytes(), tmp_path)
    assert (info.codec, info.pix_fmt, info.frames, info.fps) == ("h264", "yuv420p", 17, 16.0)
    assert info.faststart and media.duration_seconds == round(17 / 16, 4)
    thumb = Image.open(media.thumbnail_path)
    assert thumb.format == "WEBP" and thumb.size == (96, 64)  # smaller than 256: not upscaled


def test_thumbnail_is_the_middle_frame_at_most_256px(tmp_path):
    media = encode(frames(9, 480, 832), tmp_path, as_video=True, fps=16)
    thumb = Image.open(media.thumbnail_path).convert("RGB")
    assert thumb.size == (256, 148)
    assert abs(np.asarray(thumb).mean() - 0.5 * 255) < 3  # frame 4 of 0..8 is the 0.5 gray


def test_image_encoding_is_png(tmp_path):
    media = encode(frames(1), tmp_path, as_video=False, fps=16)
    assert media.format == "png" and media.content_type == "image/png" and media.frames == 1
    assert Image.open(media.path).format == "PNG"


def test_storage_uploads_with_content_type_and_presigns(s3, tmp_path):
    path = tmp_path / "0.mp4"
    path.write_bytes(b"video-bytes")
    storage = Storage(Settings(**{k.lower(): v for k, v in s3.env().items()}, presign_expiry_s=120))
    (obj,) = storage.store([(path, "u/j/0.mp4", "video/mp4")])
    assert obj.path == "u/j/0.mp4" and "X-Amz-Expires=120" in obj.url
    response = requests.get(obj.url, timeout=10)
    assert response.content == b"video-bytes" and response.headers["Content-Type"] == "video/mp4"


def test_storage_refuses_bad_credentials_clearly_and_without_retry(s3, tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"x")
    env = {k.lower(): v for k, v in s3.env().items()} | {"bucket_secret_access_key": "wrong-secret-key"}
    with pytest.raises(StorageError) as info:
        Storage(Settings(**env, upload_attempts=3)).store([(path, "k", "image/png")])
    assert info.value.retryable is False and "credentials" in info.value.message
    assert "wrong-secret-key" not in info.value.message


def test_inline_fallback_has_a_cap(tmp_path):
    path = tmp_path / "0.png"
    path.write_bytes(b"\x89PNG" + b"x" * 100)
    (obj,) = Storage(Settings(inline_max_bytes=1000)).store([(path, "k", "image/png")])
    assert obj.url.startswith("data:image/png;base64,") and obj.path is None
    with pytest.raises(StorageError) as info:
        Storage(Settings(inline_max_bytes=10)).store([(path, "k", "image/png")])
    assert info.value.code == "storage_not_configured" and "BUCKET_ENDPOINT_URL" in info.value.message


def test_progress_is_throttled_but_keeps_stages_and_last_step():
    now = [0.0]
    sent: list[dict] = []
    progress = Progress(sent.append, min_interval=1.0, clock=lambda: now[0])
    progress.enter("generating")
    for step in range(1, 26):
        now[0] += 0.1
        progress.step(step, 25)
    progress.enter("encoding")
    steps = [p for p in sent if "step" in p]
    assert 2 <= len(steps) <= 4 and steps[-1]["step"] == 25 and steps[-1]["percentage"] == 88.0
    assert steps[0]["eta_seconds"] > 0 and sent[-1] == {"stage": "encoding", "percentage": 88}


def test_settings_hide_secrets_in_repr():
    s = Settings(bucket_secret_access_key="very-secret-value", callback_secret="cb-secret-value")
    assert "very-secret-value" not in repr(s) and "cb-secret-value" not in repr(s)
    assert set(s.secret_values()) == {"very-secret-value", "cb-secret-value"}


def test_json_logs_carry_job_id_and_redact_secrets():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactSecrets(["hunter2-secret"]))
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    token = logs.job_id_var.set("job-9")
    try:
        logger.warning("failed with %s", "key=hunter2-secret", extra={"detail": "x hunter2-secret"})
    finally:
        logs.job_id_var.reset(token)
    entry = json.loads(stream.getvalue())
    assert entry["job_id"] == "job-9" and "hunter2" not in stream.getvalue()
    assert entry["msg"] == "failed with key=[REDACTED]" and entry["detail"] == "x [REDACTED]"
