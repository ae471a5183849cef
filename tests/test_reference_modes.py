"""Every reference mode conditions the output through the real VACE / video-to-video pipelines.

In-process tests wrap the real pipelines' ``__call__`` to record what they received (and
then run them for real); end-to-end tests go through ``handler.py --rp_serve_api``.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests
from diffusers import WanPipeline, WanVACEPipeline, WanVideoToVideoPipeline
from helpers.refserver import RefServer

from wan_worker.contract.settings import Settings
from wan_worker.serving.worker import Worker

SMALL = {"width": 256, "height": 256}
VIDEO = {
    "job_type": "video_fast",
    "prompt": "a ball rolls",
    "seed": 3,
    "frame_num": 9,
    **SMALL,
    "config": {"num_inference_steps": 2},
}
#: The same job in one frame, where the frame count is not what a test is about (decoding is the cost).
ONE_FRAME = {**VIDEO, "frame_num": 1}


@pytest.fixture(scope="module")
def server():
    srv = RefServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def worker(tiny_models):
    return Worker(
        Settings(
            model_profile="tiny",
            tiny_models_dir=tiny_models,
            allow_private_reference_urls=True,
            inline_max_bytes=50_000_000,
            reference_timeout_s=2.0,
        )
    )


@pytest.fixture(scope="module")
def plain_video(worker) -> dict:
    """``VIDEO`` without references, in process: the same seed gives the same bytes every time."""
    return run(worker, VIDEO)


@pytest.fixture(scope="module")
def plain_video_via_api(api_worker) -> dict:
    """``VIDEO`` without references, through the local API."""
    return api_worker.runsync(VIDEO)["output"]


@pytest.fixture
def calls(monkeypatch):
    """Record the kwargs each real pipeline class receives, then run it unchanged."""
    recorded: list[tuple[str, dict]] = []
    for cls in (WanPipeline, WanVACEPipeline, WanVideoToVideoPipeline):
        original = cls.__call__

        def spy(self, *args, _original=original, _name=cls.__name__, **kwargs):
            recorded.append((_name, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return recorded


def run(worker: Worker, job_input: dict) -> dict:
    return worker.handle({"id": "test-job", "input": job_input}, send=lambda payload: None)


def asset_bytes(out: dict) -> bytes:
    return base64.b64decode(out["assets"][0]["url"].split(",", 1)[1])


def is_color(image, rgb, tol=40) -> bool:
    px = np.asarray(image.convert("RGB"))[100:150, 100:150].reshape(-1, 3).mean(0)
    return bool(np.all(np.abs(px - np.array(rgb)) < tol))


def test_vace_transformer_loads_lazily_and_shares_encoder_and_vae(worker, server, calls):
    run(worker, ONE_FRAME)
    assert "vace" not in worker.manager.load_seconds
    run(worker, {**ONE_FRAME, "first_frame": server.url("/red.png")})
    vace = worker.manager.pipeline("vace")
    base = worker.manager.encoder_pipe()
    assert vace.vae is base.vae and vace.text_encoder is None
    assert worker.manager.pipeline("t2v").text_encoder is None
    loaded_at = worker.manager.load_seconds["vace"]
    run(worker, {**ONE_FRAME, "last_frame": server.url("/blue.png")})
    assert worker.manager.load_seconds["vace"] == loaded_at  # resident, not reloaded


@pytest.mark.parametrize(
    "mode, fields",
    [
        ("single", {"reference_image_url": "/red.png"}),
        ("start", {"first_frame": "/red.png"}),
        ("end", {"last_frame": "/blue.png"}),
        ("both", {"first_frame": "/red.png", "last_frame": "/blue.png"}),
    ],
)
def test_each_video_mode_conditions_vace(worker, server, plain_video, calls, mode, fields):
    baseline = plain_video
    job = {**VIDEO, **{k: server.url(v) for k, v in fields.items()}, "denoise_strength": 0.25}
    out = run(worker, job)
    assert out["status"] == "completed", out
    name, kwargs = calls[-1]
    assert name == "WanVACEPipeline"
    assert kwargs["conditioning_scale"] == pytest.approx(1.5)  # 2 * (1 - 0.25)
    if mode == "single":
        (ref,) = kwargs["reference_images"]
        assert ref.size == (256, 256) and is_color(ref, (220, 30, 30))
        assert "video" not in kwargs and "mask" not in kwargs
    else:
        video, mask = kwargs["video"], kwargs["mask"]
        assert len(video) == len(mask) == 9
        kept = {"start": [0], "end": [8], "both": [0, 8]}[mode]
        for i in range(9):
            if i in kept:
                assert is_color(mask[i], (0, 0, 0), 1)
                assert is_color(video[i], (220, 30, 30) if i == 0 else (30, 30, 220))
            else:
                assert is_color(mask[i], (255, 255, 255), 1) and is_color(video[i], (128, 128, 128), 1)
    meta = out["assets"][0]["metadata"]
    assert meta["pipeline"] == "vace"
    assert meta["reference_mode_requested"] == meta["reference_mode_applied"] == mode
    assert meta["denoise_strength"] == 0.25 and meta["conditioning_scale"] == 1.5
    assert meta["resize_policy"] == "center_crop"
    assert asset_bytes(out) != asset_bytes(baseline)


def test_config_and_metadata_fallbacks_feed_the_references(worker, server, calls):
    out = run(
        worker,
        {
            **VIDEO,
            "frame_num": 5,  # room for a first and a last frame; the count itself is not checked
            "config": {"num_inference_steps": 2, "first_frame": server.url("/red.png")},
            "metadata": {"end_reference_url": server.url("/blue.png"), "reference_strength": 0.8},
        },
    )
    meta = out["assets"][0]["metadata"]
    assert meta["reference_mode_applied"] == "both"
    assert meta["denoise_strength"] == pytest.approx(0.2)  # 1 - reference_strength
    assert out["metadata"]["denoise_source"].startswith("metadata.reference_strength")


def test_image_job_with_reference_runs_image_to_image(worker, server, calls):
    job = {
        "job_type": "image_fast",
        "prompt": "a red square",
        "seed": 9,
        **SMALL,
        "reference_image_url": server.url("/red.png"),
        "denoise_strength": 0.4,
        "config": {"num_inference_steps": 10},
    }
    out = run(worker, job)
    name, kwargs = calls[-1]
    assert name == "WanVideoToVideoPipeline"
    assert len(kwargs["video"]) == 1 and kwargs["strength"] == pytest.approx(0.4)
    assert out["metadata"]["steps"] == 4  # int(10 * 0.4): reported steps follow strength
    meta = out["assets"][0]["metadata"]
    assert meta["pipeline"] == "i2i" and meta["format"] == "png" and meta["denoise_strength"] == 0.4

    converted = run(worker, {**job, "denoise_strength": None, "reference_strength": 0.7})
    assert converted["assets"][0]["metadata"]["denoise_strength"] == pytest.approx(0.3)
    assert converted["metadata"]["steps"] == 3


def test_exact_copy_mode_clamps(worker, server, calls):
    out = run(
        worker,
        {
            "job_type": "image_high",
            "prompt": "copy",
            "seed": 1,
            **SMALL,
            "negative_prompt": "ugly",
            "reference_image_url": server.url("/red.png"),
            "denoise_strength": 0.9,
            "metadata": {"exact_copy_mode": True},
        },
    )
    meta, asset = out["metadata"], out["assets"][0]["metadata"]
    assert asset["denoise_strength"] == 0.05
    assert meta["guidance_scale"] == 1.0 and meta["negative_prompt"] == ""
    assert 6 <= meta["scheduler_steps"] <= 10 and meta["steps"] == 1
    _name, kwargs = calls[-1]
    assert kwargs["guidance_scale"] == 1.0 and kwargs["negative_prompt_embeds"] is None


def test_outside_exact_copy_parameters_are_respected(worker, server, calls):
    out = run(
        worker,
        {
            "job_type": "image_high",
            "prompt": "p",
            **SMALL,
            "reference_image_url": server.url("/red.png"),
            "denoise_strength": 0.9,
            "config": {"num_inference_steps": 5, "guidance_scale": 9.0},
        },
    )
    assert out["metadata"]["guidance_scale"] == 9.0 and out["metadata"]["steps"] == 4
    assert out["assets"][0]["metadata"]["denoise_strength"] == 0.9


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/missing.png", "HTTP 404"),
        ("/notimage", "not a decodable image"),
        ("/bomb.png", "over the cap"),
        ("/hang", "timed out"),
    ],
)
def test_unusable_reference_falls_back_visibly(worker, server, calls, path, reason):
    out = run(worker, {**ONE_FRAME, "first_frame": server.url(path)})
    assert out["status"] == "completed"
    meta = out["assets"][0]["metadata"]
    assert meta["reference_mode_requested"] == "start" and meta["reference_mode_applied"] == "none"
    assert meta["pipeline"] == "t2v" and calls[-1][0] == "WanPipeline"
    assert any(reason in w and "first_frame" in w for w in out["warnings"]), out["warnings"]


def test_strict_references_fail_instead(worker, server):
    out = run(worker, {**ONE_FRAME, "first_frame": server.url("/notimage"), "strict_references": True})
    assert out["error_code"] == "reference_unavailable" and "first_frame" in out["error"]
    assert run(worker, ONE_FRAME)["status"] == "completed"  # still serving


def test_private_reference_refused_without_allow(tiny_models, server):
    strict = Worker(Settings(model_profile="tiny", tiny_models_dir=tiny_models, inline_max_bytes=50_000_000))
    out = run(strict, {**ONE_FRAME, "reference_image_url": server.url("/red.png")})
    assert out["assets"][0]["metadata"]["reference_mode_applied"] == "none"
    assert any("non-public" in w for w in out["warnings"])


def test_mode_without_its_image_names_the_field(worker):
    out = run(worker, {**VIDEO, "reference_mode": "both", "first_frame": "https://example.com/a.png"})
    assert out["error_code"] == "invalid_input" and out["field"] == "last_frame"
    out = run(worker, {**VIDEO, "first_frame": "ftp://example.com/a.png"})
    assert out["error_code"] == "invalid_input" and out["field"] == "first_frame"


@pytest.mark.parametrize(
    "fields, mode, kept, refs",
    [
        ({"reference_image_url": "/red.png"}, "single", [], 1),
        ({"first_frame": "/red.png"}, "start", [0], 0),
        ({"last_frame": "/blue.png"}, "end", [8], 0),
        ({"first_frame": "/red.png", "last_frame": "/blue.png"}, "both", [0, 8], 0),
    ],
)
def test_each_mode_end_to_end_through_handler(api_worker, plain_video_via_api, server, fields, mode, kept, refs):
    plain = plain_video_via_api
    out = api_worker.runsync({**VIDEO, **{k: server.url(v) for k, v in fields.items()}})
    assert out["status"] == "COMPLETED", out
    asset = out["output"]["assets"][0]
    meta = asset["metadata"]
    assert meta["pipeline"] == "vace" and meta["reference_mode_applied"] == mode
    assert meta["conditioning"] == {"reference_images": refs, "kept_frames": kept}
    assert meta["conditioning_scale"] == 1.0 and meta["denoise_strength"] == 0.5
    assert asset["path"].endswith("/0.mp4") and asset["metadata"]["frames"] == 9
    assert requests.get(asset["url"], timeout=30).content != requests.get(plain["assets"][0]["url"], timeout=30).content


def test_image_to_image_end_to_end_through_handler(api_worker, server):
    out = api_worker.runsync(
        {
            "job_type": "image_fast",
            "prompt": "p",
            "seed": 2,
            **SMALL,
            "reference_image_url": server.url("/green.png"),
            "reference_strength": 0.5,
            "config": {"num_inference_steps": 4},
        }
    )["output"]
    meta = out["assets"][0]["metadata"]
    assert meta["pipeline"] == "i2i" and meta["conditioning"] == {"input_frames": 1, "strength": 0.5}
    assert out["metadata"]["steps"] == 2 and out["assets"][0]["path"].endswith("/0.png")
