"""End to end: RunPod job in, real assets out, through the SDK's own entry points."""

from __future__ import annotations

import requests
from helpers.mediacheck import open_image, probe_video
from helpers.workers import run_test_input, worker_env

from wan_worker.infra.local_s3 import BUCKET

SMALL = {"width": 256, "height": 256}


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, url
    return response.content


def check_thumbnail(asset: dict, s3) -> None:
    thumb = open_image(fetch(asset["thumbnail_url"]))
    assert thumb.format == "WEBP"
    assert max(thumb.size) <= 256
    head = s3.client().head_object(Bucket=BUCKET, Key=asset["thumbnail_path"])
    assert head["ContentType"] == "image/webp"


def test_video_job_through_test_input(tiny_models, s3, tmp_path):
    """``python handler.py --test_input`` with a queue-shape job: MP4 in the bucket, honest metadata."""
    job = {
        "id": "job-queue-1",
        "type": "video_fast",
        "prompt": "a red fox in snow",
        "user_id": "user-7",
        "config": {"frame_num": 19, "size": "256*256", "num_inference_steps": 3, "seed": 11, "fps": 12},
        "metadata": {"source": "edge-fn"},
    }
    code, out, logs = run_test_input(job, worker_env(tiny_models, **s3.env()))
    assert code == 0, logs[-3000:]
    assert out["status"] == "completed" and out["job_id"] == "job-queue-1"
    (asset,) = out["assets"]
    assert asset["type"] == "video"
    assert asset["path"] == "user-7/job-queue-1/0.mp4"
    assert asset["thumbnail_path"] == "user-7/job-queue-1/0.thumb.webp"
    meta = asset["metadata"]
    assert meta["frames"] == 17  # 19 -> nearest 4k+1 (17 and 21 tie: down)
    assert meta["fps"] == 12 and meta["duration_seconds"] == round(17 / 12, 4)
    assert meta["seed"] == 11 and meta["format"] == "mp4"
    assert out["metadata"]["steps"] == 3
    assert any("frame_num: 19 -> 17" in w for w in out["warnings"])

    data = fetch(asset["url"])
    assert len(data) == meta["file_size_bytes"]
    info = probe_video(data, tmp_path)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.frames == 17 and info.fps == 12.0
    assert (info.width, info.height) == (256, 256)
    assert info.faststart
    head = s3.client().head_object(Bucket=BUCKET, Key=asset["path"])
    assert head["ContentType"] == "video/mp4"
    check_thumbnail(asset, s3)


def test_image_job_returns_png_via_runsync(api_worker, s3):
    out = api_worker.runsync({"job_type": "image_fast", "prompt": "a lighthouse", "seed": 5, **SMALL, "frame_num": 33})
    assert out["status"] == "COMPLETED", out
    result = out["output"]
    (asset,) = result["assets"]
    assert asset["type"] == "image" and asset["path"].endswith("/0.png")
    assert asset["metadata"]["frames"] == 1 and asset["metadata"]["format"] == "png"
    assert asset["metadata"]["duration_seconds"] == 0
    image = open_image(fetch(asset["url"]))
    assert image.format == "PNG" and image.size == (256, 256)
    assert s3.client().head_object(Bucket=BUCKET, Key=asset["path"])["ContentType"] == "image/png"
    assert any("frame_num" in w for w in result["warnings"])  # ignored for images, and said so
    check_thumbnail(asset, s3)


def test_same_seed_same_output_and_random_seed_reported(api_worker):
    job = {"job_type": "image_fast", "prompt": "a teapot", "seed": 1234, **SMALL, "config": {"num_inference_steps": 2}}
    first = api_worker.runsync(job)["output"]
    second = api_worker.runsync(job)["output"]
    assert fetch(first["assets"][0]["url"]) == fetch(second["assets"][0]["url"])
    other = api_worker.runsync({**job, "seed": 4321})["output"]
    assert fetch(other["assets"][0]["url"]) != fetch(first["assets"][0]["url"])
    drawn = api_worker.runsync({k: v for k, v in job.items() if k != "seed"})["output"]
    assert drawn["metadata"]["seed_source"] == "random"
    assert drawn["assets"][0]["metadata"]["seed"] == drawn["metadata"]["seed"]


def test_bad_inputs_name_the_field_and_worker_keeps_serving(api_worker):
    cases = [
        ({"job_type": "video_fast"}, "prompt"),
        ({"job_type": "video_fast", "prompt": "   "}, "prompt"),
        ({"job_type": "video_ultra", "prompt": "x"}, "job_type"),
        ({"job_type": "video_fast", "prompt": "x", "width": "480"}, "width"),
        ({"job_type": "video_fast", "prompt": "x", "width": 4096}, "width"),
        ({"job_type": "video_fast", "prompt": "x", "fps": 60}, "fps"),
        ({"job_type": "video_fast", "prompt": "x" * 2001}, "prompt"),
        ({"job_type": "video_fast", "prompt": "x", "config": {"sample_steps": 0}}, "config.sample_steps"),
    ]
    for job_input, field in cases:
        out = api_worker.runsync(job_input)
        assert out["status"] == "FAILED", (job_input, out)
        assert field in out["error"], (field, out["error"])
    ok = api_worker.runsync(
        {"job_type": "image_fast", "prompt": "still alive", **SMALL, "config": {"num_inference_steps": 1}}
    )
    assert ok["status"] == "COMPLETED"
