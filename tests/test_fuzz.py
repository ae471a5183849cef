"""Property-based fuzzing of the handler with hypothesis.

Arbitrary JSON, mutated real jobs (wrong types, huge numbers and strings, NaN/inf, deep
nesting, unknown keys), every job type crossed with every reference mode, invalid base64 and
invalid URLs go through ``Worker.handle`` in process, exactly as RunPod calls it. Each case
must end in a valid result or a structured ``{"error", "error_code", "retryable"}`` that names
the problem: never an uncaught exception, an ``internal_error``, a hang, or a worker that
cannot take the next job.

Valid jobs are kept cheap without stubbing anything: the fuzzed values of the keys that drive
cost (size, frames, steps) are either invalid or small, and a guard built on the real parser
discards the rare valid expensive job. ``JOB_TIMEOUT_S`` is the backstop.

Profiles (docs/OPERATIONS.md records the counts): ``ci`` (default, derandomized, bounded) and
``long`` (``HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py``).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import pytest
from helpers.inprocess import SMALL_IMAGE, SMALL_VIDEO, png_data_uri, tiny_worker
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from wan_worker.contract.errors import ErrorCode
from wan_worker.contract.presets import JOB_TYPES as PRESET_JOB_TYPES

COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
#: Examples per test: (ci, long).
COUNTS = {"arbitrary_json": (300, 20_000), "mutated_jobs": (150, 5_000), "references": (40, 1_500)}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
assert PROFILE in ("ci", "long"), PROFILE


def examples(test: str) -> settings:
    ci, long = COUNTS[test]
    if PROFILE == "long":
        return settings(max_examples=long, derandomize=False, **COMMON)
    return settings(max_examples=ci, derandomize=True, **COMMON)


JOB_TYPES = list(PRESET_JOB_TYPES)  # the one vocabulary, in its order
MODES = ["none", "single", "start", "end", "both"]
ERROR_CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL_ERROR}
PER_JOB_LIMIT_S = 90  # a "hang" is anything slower than this, for jobs this small

# ---------------------------------------------------------------------------------------------
# Strategies


def nested(depth: int) -> Any:
    value: Any = "deep"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


HUGE_STRINGS = st.sampled_from(["x" * 2001, "y" * 200_000, "\ud800", "\x00\x01", "é" * 2000, "🎬" * 1500, " " * 50])
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**31, 2**32, 2**63, -(2**63), 10**30, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=40),
    HUGE_STRINGS,
)
JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)
ANY = st.one_of(JSON, st.integers(min_value=1, max_value=3000).map(nested))

GOOD_REF = png_data_uri((48, 40))
BAD_REFERENCES = [
    "data:image/png;base64,not base64!!",
    "data:image/png;base64,AAAA",  # valid base64, not an image
    "data:image/png;base64,",
    "data:image/png,rawbytes",
    "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
    "http://[::1",  # unbalanced IPv6 bracket
    "http://[not-an-ip]/x.png",
    "http://example.com:99999/x.png",  # port out of range
    "http://",
    "https://:80/x.png",
    "http://256.256.256.256/x.png",
    "http://127.0.0.1:1/x.png",  # loopback: refused
    "http://10.0.0.1/x.png",
    "http://169.254.169.254/latest/meta-data",
    "http://localhost/x.png",
    "http://host.invalid/x.png",
    "ftp://example.com/x.png",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "HTTP://EXAMPLE.COM\x00/x.png",
    "https://exa mple.com/x.png",
    "http://xn--/x.png",
    "http://" + "a" * 300 + ".com/x.png",
]
REFERENCES = st.one_of(st.sampled_from([GOOD_REF, *BAD_REFERENCES]), JSON)
URLS = st.one_of(st.sampled_from(BAD_REFERENCES + ["http://127.0.0.1:9/cb", "https://platform.example/cb"]), JSON)

#: Keys whose value drives the cost of a valid job: fuzzed values are invalid, or valid and small.
COST_KEYS = {
    "width": [256, 272, 250, 1296],
    "height": [256, 272, 250, 1296],
    "frame_num": [1, 2, 5, 9, 0, 1442],
}
CONFIG_COST_KEYS = {
    "num_inference_steps": [1, 2, 3, 0, 101],
    "sample_steps": [1, 2, 0, 101],
    "size": ["256*256", "272x256", "256*", "0*0", "99999*256", "²*²"],
    "width": [256, 250],
    "height": [256, 1296],
    "frame_num": [1, 5, 0, 1442],
}


def not_valid_number(v: Any) -> bool:
    """Anything but an int that a size/frames/steps field would accept (those come from the lists)."""
    return not (isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= 1280)


def cost_value(choices: list) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(choices), JSON.filter(not_valid_number))


TOP_KEYS = {
    "job_type": st.one_of(st.sampled_from(JOB_TYPES), JSON),
    "type": st.one_of(st.sampled_from(JOB_TYPES), JSON),
    "prompt": st.one_of(st.text(min_size=1, max_size=80), JSON),
    "negative_prompt": JSON,
    "fps": JSON,
    "quality": st.one_of(st.sampled_from(["fast", "balanced", "high", "ultra"]), JSON),
    "seed": JSON,
    "enhance_prompt": JSON,
    "step_cache": st.one_of(st.sampled_from(["auto", "on", "off"]), JSON),
    "reference_mode": st.one_of(st.sampled_from(MODES), JSON),
    "reference_image_url": REFERENCES,
    "first_frame": REFERENCES,
    "last_frame": REFERENCES,
    "denoise_strength": JSON,
    "reference_strength": JSON,
    "strict_references": JSON,
    "target_worker": st.one_of(st.just("wan"), JSON),
    "callback_url": URLS,
    "model": JSON,
    "action": st.one_of(st.sampled_from(["generate", "enhance", "health", "debug_env", "nope"]), JSON),
    "id": JSON,
    "user_id": st.one_of(st.sampled_from(["u-1", "../../etc", "a" * 200]), JSON),
    "metadata": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "reference_image_url": REFERENCES,
                "start_reference_url": REFERENCES,
                "end_reference_url": REFERENCES,
                "reference_strength": JSON,
                "denoise_strength": JSON,
                "exact_copy_mode": JSON,
                "source": JSON,
            },
        ),
        JSON,
    ),
    **{k: cost_value(v) for k, v in COST_KEYS.items()},
}
CONFIG_KEYS = {
    "guidance_scale": JSON,
    "sample_guide_scale": JSON,
    "seed": JSON,
    "sample_shift": JSON,
    "fps": JSON,
    "negative_prompt": JSON,
    "image": REFERENCES,
    "first_frame": REFERENCES,
    "last_frame": REFERENCES,
    "denoise_strength": JSON,
    "reference_strength": JSON,
    "unknown_override": JSON,
    **{k: cost_value(v) for k, v in CONFIG_COST_KEYS.items()},
}

FRONT_END = {**SMALL_VIDEO, "prompt": "a fuzzed fox", "frame_num": 5}
QUEUE = {
    "id": "q-fuzz",
    "type": "image_fast",
    "prompt": "a fuzzed owl",
    "user_id": "u-fuzz",
    "config": {"num_inference_steps": 1, "size": "256*256", "frame_num": 5},
    "metadata": {"source": "edge"},
}


@st.composite
def mutated_jobs(draw) -> dict:
    job = {**draw(st.sampled_from([FRONT_END, QUEUE, SMALL_IMAGE]))}
    job["config"] = {**job.get("config", {})}
    for key in draw(st.lists(st.sampled_from(sorted(TOP_KEYS)), max_size=5, unique=True)):
        job[key] = draw(TOP_KEYS[key])
    if isinstance(job.get("config"), dict):
        for key in draw(st.lists(st.sampled_from(sorted(CONFIG_KEYS)), max_size=4, unique=True)):
            job["config"][key] = draw(CONFIG_KEYS[key])
    if draw(st.booleans()):
        job["config"] = draw(st.one_of(JSON.filter(lambda v: not isinstance(v, dict)), st.just(job["config"])))
    for key, value in draw(st.dictionaries(st.text(min_size=1, max_size=30), ANY, max_size=3)).items():
        job.setdefault(key, value)  # unknown top-level keys
    return job


# ---------------------------------------------------------------------------------------------
# The harness


@pytest.fixture(scope="module")
def fuzz_worker(tiny_models):
    """One worker for every example: the point is that it keeps taking jobs."""
    return tiny_worker(
        tiny_models,
        job_timeout_s=60,
        reference_timeout_s=2,
        allow_private_reference_urls=False,
        enhance_max_new_tokens=16,
        enhance_timeout_s=5,
        inline_max_bytes=50 * 1024 * 1024,
    )


def too_costly(job_input: Any) -> bool:
    """True for the rare valid job that is too expensive for CI (checked with the real parser)."""
    from wan_worker.contract.errors import WorkerError
    from wan_worker.contract.jobs import build_job
    from wan_worker.contract.schema import parse_job_input

    try:
        inp = parse_job_input(job_input)
        if inp.action != "generate":
            return False
        job = build_job(inp, job_id="guard")
    except WorkerError:
        return False
    return job.width * job.height * job.num_frames > 272 * 272 * 9 or job.steps > 50


def run_bounded(worker, job_input: Any, job_id: Any = "fuzz") -> dict:
    """``worker.handle`` in a thread: an exception or a hang fails the example."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = worker.handle({"id": job_id, "input": job_input}, send=lambda payload: None)
        except BaseException as exc:  # noqa: BLE001 - recorded and re-raised below
            box["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(PER_JOB_LIMIT_S)
    assert not thread.is_alive(), f"the handler hung for over {PER_JOB_LIMIT_S}s"
    if "exc" in box:
        raise AssertionError(f"uncaught {type(box['exc']).__name__} escaped the handler: {box['exc']!r}") from box[
            "exc"
        ]
    return box["out"]


def check_contract(job_input: Any, out: Any) -> None:
    assert isinstance(out, dict), out
    event(f"outcome: {out.get('error_code') or out.get('status') or 'action'}")
    if "error" in out:
        assert isinstance(out["error"], str) and out["error"].strip()
        assert out["error_code"] in ERROR_CODES, out  # never "internal_error": the problem is named
        assert isinstance(out["retryable"], bool)
        if out["error_code"] == "invalid_input":
            assert out.get("field"), out
            assert out["field"].split(".")[0] in out["error"] or out["field"] == "input", out
        return
    if isinstance(job_input, dict) and job_input.get("action") in ("health", "debug_env", "enhance"):
        assert out.get("worker") == "wan", out
        return
    assert out["status"] == "completed", out
    (asset,) = out["assets"]
    assert asset["url"] and asset["thumbnail_url"]
    assert asset["metadata"]["width"] % 16 == 0 and asset["metadata"]["frames"] >= 1
    assert out["job_id"]


def next_job_works(worker) -> None:
    out = run_bounded(worker, {**SMALL_IMAGE, "prompt": "the next job"})
    assert out.get("status") == "completed", out


# ---------------------------------------------------------------------------------------------
# The properties


@examples("arbitrary_json")
@given(job_input=ANY, job_id=st.one_of(st.text(max_size=40), st.integers(), st.none()))
def test_arbitrary_json_input(fuzz_worker, job_input, job_id):
    assume(not too_costly(job_input))
    check_contract(job_input, run_bounded(fuzz_worker, job_input, job_id))


@examples("mutated_jobs")
@given(job_input=mutated_jobs())
# Found by this fuzzer (now fixed): a malformed URL raised ValueError out of urlsplit.
@example(job_input={**SMALL_IMAGE, "callback_url": "http://[::1"})
@example(job_input={**SMALL_IMAGE, "callback_url": "http://example.com:99999/"})
@example(job_input={**SMALL_IMAGE, "first_frame": "http://[::1", "strict_references": True})
@example(job_input={**SMALL_IMAGE, "first_frame": "http://example.com:99999/x.png"})
def test_mutated_jobs(fuzz_worker, job_input):
    assume(not too_costly(job_input))
    check_contract(job_input, run_bounded(fuzz_worker, job_input))


@examples("references")
@given(
    job_type=st.sampled_from(JOB_TYPES),
    mode=st.sampled_from([*MODES, None]),
    sources=st.dictionaries(
        st.sampled_from(
            [
                "reference_image_url",
                "first_frame",
                "last_frame",
                "config.image",
                "config.first_frame",
                "config.last_frame",
                "metadata.reference_image_url",
                "metadata.start_reference_url",
                "metadata.end_reference_url",
            ]
        ),
        st.sampled_from([GOOD_REF, *BAD_REFERENCES]),
        max_size=3,
    ),
    strict=st.booleans(),
    strength=st.one_of(st.none(), st.sampled_from([0.0, 0.05, 0.5, 1.0, -0.1, 1.5, math.nan])),
    exact_copy=st.booleans(),
)
def test_every_job_type_and_reference_mode(fuzz_worker, job_type, mode, sources, strict, strength, exact_copy):
    job: dict[str, Any] = {
        "job_type": job_type,
        "prompt": "a fuzzed reference job",
        "width": 256,
        "height": 256,
        "frame_num": 5,
        "strict_references": strict,
        "config": {"num_inference_steps": 1},
        "metadata": {"exact_copy_mode": exact_copy},
    }
    if mode is not None:
        job["reference_mode"] = mode
    if strength is not None:
        job["denoise_strength"] = strength
    for path, value in sources.items():
        holder, _, key = path.rpartition(".")
        (job[holder] if holder else job)[key] = value
    out = run_bounded(fuzz_worker, job)
    check_contract(job, out)
    if "error" not in out:
        meta = out["assets"][0]["metadata"]
        assert meta["reference_mode_requested"] in MODES and meta["reference_mode_applied"] in MODES
        if meta["reference_mode_applied"] != meta["reference_mode_requested"]:
            assert any("fell back" in w for w in out["warnings"]), out["warnings"]


@pytest.mark.parametrize("job_type", JOB_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_strict_invalid_reference_names_the_field(fuzz_worker, job_type, mode):
    """Every job type x every mode with an undecodable reference and ``strict_references``."""
    bad = "data:image/png;base64,%%%"
    fields = {
        "single": ["reference_image_url"],
        "start": ["first_frame"],
        "end": ["last_frame"],
        "both": ["first_frame", "last_frame"],
        "none": [],
    }[mode]
    job = {
        "job_type": job_type,
        "prompt": "strict",
        "width": 256,
        "height": 256,
        "frame_num": 5,
        "reference_mode": mode,
        "strict_references": True,
        "config": {"num_inference_steps": 1},
        **{f: bad for f in fields},
    }
    if mode == "none":
        job["reference_image_url"] = bad  # given but not used: no error, a warning
        out = run_bounded(fuzz_worker, job)
        assert out["status"] == "completed" and any("not used" in w for w in out["warnings"])
        return
    out = run_bounded(fuzz_worker, job)
    assert out["error_code"] == "reference_unavailable" and out["retryable"] is False, out
    used = fields[0]  # image jobs take one picture: the start frame for "both"
    assert used in out["error"] and out["field"] == used, out


def test_worker_still_serves_after_the_fuzzing(fuzz_worker):
    next_job_works(fuzz_worker)
    health = run_bounded(fuzz_worker, {"action": "health"})
    assert health["status"] == "healthy" and health["jobs_done"] > 10
