"""Input validation and normalisation: both wire shapes become one clamped, honest Job."""

from __future__ import annotations

import pytest

from wan_worker.contract import presets as P
from wan_worker.contract.errors import InvalidInput
from wan_worker.contract.jobs import build_job
from wan_worker.contract.schema import parse_job_input


def job(raw: dict, job_id: str = "j1"):
    return build_job(parse_job_input(raw), job_id)


@pytest.mark.parametrize(
    "frames, expected", [(1, 1), (2, 1), (3, 1), (4, 5), (5, 5), (81, 81), (83, 81), (84, 85), (121, 121)]
)
def test_frames_snap_to_nearest_4k_plus_1(frames, expected):
    assert P.nearest_valid_frames(frames) == expected


@pytest.mark.parametrize("job_type", sorted(P.JOB_TYPES))
def test_every_job_type_has_its_preset(job_type):
    j = job({"job_type": job_type, "prompt": "p"})
    preset = P.JOB_TYPES[job_type]
    assert j.kind == preset.kind and j.enhance_prompt == preset.enhance_prompt
    assert j.num_frames == (1 if preset.kind == "image" else 81)
    assert j.steps == P.QUALITY_PRESETS[preset.quality].steps
    assert j.guidance_scale == P.QUALITY_PRESETS[preset.quality].guidance_scale
    assert (j.width, j.height, j.fps, j.flow_shift) == (480, 832, 16, 5.0)


def test_front_end_shape():
    j = job(
        {
            "job_type": "video7b_high_enhanced",
            "prompt": " a cat ",
            "negative_prompt": "blur",
            "width": 512,
            "height": 768,
            "frame_num": 83,
            "fps": 24,
            "quality": "balanced",
            "seed": 7,
            "target_worker": "wan",
        }
    )
    assert (j.prompt, j.negative_prompt, j.width, j.height) == ("a cat", "blur", 512, 768)
    assert (j.num_frames, j.fps, j.quality, j.steps, j.guidance_scale) == (81, 24, "balanced", 35, 7.0)
    assert (j.seed, j.seed_source, j.enhance_prompt) == (7, "request", True)
    assert "frame_num: 83 -> 81 (Wan needs 4k+1 frames)" in j.adjustments


def test_queue_shape_with_config_overrides():
    j = job(
        {
            "id": "abc",
            "type": "video_fast",
            "prompt": "p",
            "user_id": "u1",
            "config": {
                "sample_steps": 30,
                "sample_guide_scale": 5.5,
                "seed": 3,
                "sample_shift": 3.0,
                "frame_num": 49,
                "size": "832*480",
                "mystery": 1,
            },
            "metadata": {"anything": "passes"},
        }
    )
    assert (j.steps, j.guidance_scale, j.seed, j.flow_shift, j.num_frames) == (30, 5.5, 3, 3.0, 49)
    assert (j.width, j.height, j.user_id) == (832, 480, "u1")
    assert j.ignored_overrides == ["config.mystery"]


def test_front_end_fields_win_over_config():
    j = job(
        {
            "job_type": "video_fast",
            "prompt": "p",
            "width": 640,
            "seed": 1,
            "config": {"width": 320, "seed": 2, "num_inference_steps": 10},
        }
    )
    assert (j.width, j.seed, j.steps) == (640, 1, 10)


def test_size_snaps_to_multiple_of_16_and_says_so():
    j = job({"job_type": "video_fast", "prompt": "p", "width": 500})
    assert j.width == 496 and any("width: 500 -> 496" in a for a in j.adjustments)


def test_random_seed_is_drawn_and_reported():
    seeds = {job({"prompt": "p"}).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s <= P.SEED_MAX for s in seeds)
    assert job({"prompt": "p", "seed": -1}).seed_source == "random"


def test_unknown_top_level_fields_are_reported_not_fatal():
    assert job({"prompt": "p", "foo": 1, "bar": {}}).ignored_fields == ["bar", "foo"]


def test_image_jobs_ignore_frame_num_visibly():
    j = job({"job_type": "image_high", "prompt": "p", "frame_num": 33})
    assert j.num_frames == 1 and any("frame_num" in o for o in j.ignored_overrides)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "p", "job_type": "nope"}, "job_type"),
        ({"prompt": "p", "type": "video_fast", "job_type": "image_fast"}, "input"),
        ({"prompt": "p", "width": 1600}, "width"),
        ({"prompt": "p", "height": 100}, "height"),
        ({"prompt": "p", "width": 480.0}, "width"),
        ({"prompt": "p", "fps": 30}, "fps"),
        ({"prompt": "p", "frame_num": 0}, "frame_num"),
        ({"prompt": "p", "seed": 2**40}, "seed"),
        ({"prompt": "p", "seed": True}, "seed"),
        ({"prompt": "p", "quality": "ultra"}, "quality"),
        ({"prompt": "p", "denoise_strength": 1.5}, "denoise_strength"),
        ({"prompt": "p", "denoise_strength": float("nan")}, "denoise_strength"),
        ({"prompt": "p", "target_worker": "sdxl"}, "target_worker"),
        ({"prompt": "p", "config": {"guidance_scale": 50}}, "config.guidance_scale"),
        ({"prompt": "p", "config": {"size": "big"}}, "config.size"),
        ({"prompt": "p", "config": []}, "config"),
        ({"prompt": "p", "user_id": "../../etc"}, "user_id"),
        ({"prompt": "p", "first_frame": "file:///etc/passwd"}, "first_frame"),
        ({"prompt": "x" * (P.PROMPT_MAX_CHARS + 1)}, "prompt"),
    ],
)
def test_bad_input_names_the_field(raw, field):
    with pytest.raises(InvalidInput) as info:
        job(raw)
    assert info.value.field == field, info.value.message
    assert field in info.value.message


def test_non_object_input_is_refused():
    for raw in (None, "text", [1, 2], 3):
        with pytest.raises(InvalidInput, match="must be a JSON object"):
            parse_job_input(raw)


def test_reference_mode_inference_and_precedence():
    j = job(
        {
            "prompt": "p",
            "first_frame": "https://a/1.png",
            "config": {"first_frame": "https://b/2.png"},
            "metadata": {"end_reference_url": "https://c/3.png"},
        }
    )
    assert j.reference_mode_requested == "both"
    assert j.references["start"].value == "https://a/1.png" and j.references["start"].field == "first_frame"
    assert j.references["end"].field == "metadata.end_reference_url"
    assert job({"prompt": "p", "config": {"image": "https://a/1.png"}}).reference_mode_requested == "single"
    assert job({"prompt": "p"}).pipeline == "t2v"


def test_strength_rules():
    assert job({"prompt": "p", "first_frame": "https://a/1.png"}).denoise_strength == P.DEFAULT_VACE_DENOISE
    i2i = job(
        {
            "job_type": "image_fast",
            "prompt": "p",
            "reference_image_url": "https://a/1.png",
            "metadata": {"reference_strength": 0.25},
        }
    )
    assert i2i.pipeline == "i2i" and i2i.denoise_strength == 0.75
    assert P.conditioning_scale_for(0.5) == 1.0 and P.conditioning_scale_for(0.0) == 2.0
    assert [P.exact_copy_steps(d) for d in (0.0, 0.05, 0.08, 0.5)] == [6, 6, 8, 10]
