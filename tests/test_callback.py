"""The platform's job callback, against a real local HTTP receiver.

The receiver verifies ``X-Callback-Signature: sha256=<HMAC-SHA256(secret, raw body)>`` as the
platform's edge function does, answers with scripted statuses, and counts deliveries.
"""

from __future__ import annotations

import time

import pytest
from helpers.callbacks import CallbackReceiver
from helpers.inprocess import SMALL_IMAGE, SMALL_VIDEO, handle, s3_settings, tiny_worker
from helpers.logcapture import CALLBACK_SECRET
from helpers.workers import run_test_input, worker_env

from wan_worker.infra.local_s3 import BUCKET, free_port


def callback_worker(tiny_models, s3, url, **extra):
    return tiny_worker(
        tiny_models,
        **s3_settings(s3),
        callback_url=url,
        callback_secret=CALLBACK_SECRET,
        **{"callback_attempts": 4, **extra},
    )


def assert_stored(s3, out):
    (asset,) = out["assets"]
    for key in (asset["path"], asset["thumbnail_path"]):
        assert s3.client().head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0


def test_success_callback_is_signed_retried_after_500s_and_uses_bucket_paths(tiny_models, s3):
    with CallbackReceiver(statuses=[500, 500]) as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(worker, {**SMALL_VIDEO, "id": "cb-ok-1", "user_id": "u-cb"})

    assert out["status"] == "completed", out
    assert out["callback_delivered"] is True
    assert [d.status for d in receiver.deliveries] == [500, 500, 200]
    assert all(d.signature_ok for d in receiver.deliveries)
    assert len({d.body for d in receiver.deliveries}) == 1  # retries resend the same signed bytes
    assert receiver.deliveries[0].headers["Content-Type"] == "application/json"

    body = receiver.deliveries[-1].json()
    assert set(body) == {"job_id", "status", "assets", "error_message", "metadata"}
    assert body["job_id"] == out["job_id"] == "cb-ok-1"
    assert body["status"] == "completed" and body["error_message"] is None
    (sent,) = body["assets"]
    (asset,) = out["assets"]
    # Bucket-relative paths in the callback; the full presigned URLs stay in the job output.
    assert sent["url"] == asset["path"] == "u-cb/cb-ok-1/0.mp4"
    assert sent["thumbnail_url"] == asset["thumbnail_path"] == "u-cb/cb-ok-1/0.thumb.webp"
    assert asset["url"].startswith("http") and "://" not in sent["url"]
    assert sent["type"] == "video" and sent["metadata"]["frames"] == 5
    assert body["metadata"]["seed"] == 3
    assert_stored(s3, out)


def test_4xx_is_not_retried_and_the_result_is_kept(tiny_models, s3):
    with CallbackReceiver(statuses=[400]) as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(worker, {**SMALL_IMAGE, "id": "cb-400"})
    assert [d.status for d in receiver.deliveries] == [400]
    assert out["status"] == "completed" and out["callback_delivered"] is False
    assert_stored(s3, out)


def test_wrong_secret_is_refused_by_the_receiver_and_not_retried(tiny_models, s3):
    with CallbackReceiver(secret="the-platforms-real-secret") as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(worker, {**SMALL_IMAGE, "id": "cb-badsig"})
    assert [(d.signature_ok, d.status) for d in receiver.deliveries] == [(False, 401)]
    assert out["status"] == "completed" and out["callback_delivered"] is False


def test_429_is_retried(tiny_models, s3):
    with CallbackReceiver(statuses=[429]) as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(worker, {**SMALL_IMAGE, "id": "cb-429"})
    assert [d.status for d in receiver.deliveries] == [429, 200]
    assert out["callback_delivered"] is True


def test_receiver_down_keeps_the_job_result(tiny_models, s3):
    url = f"http://127.0.0.1:{free_port()}/callback"  # nothing listens there
    worker = callback_worker(tiny_models, s3, url, callback_attempts=3, callback_timeout_s=2)
    started = time.monotonic()
    out = handle(worker, {**SMALL_IMAGE, "id": "cb-down", "user_id": "u-down"})
    assert time.monotonic() - started < 30
    assert out["status"] == "completed" and out["callback_delivered"] is False
    assert out["assets"][0]["path"] == "u-down/cb-down/0.png"
    assert_stored(s3, out)


def test_failure_callback_for_a_failed_job(tiny_models, s3):
    bad_reference = {
        **SMALL_VIDEO,
        "id": "cb-fail-1",
        "strict_references": True,
        "first_frame": "data:image/png;base64,not base64 at all!",
    }
    with CallbackReceiver() as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(worker, bad_reference)
    assert out["error_code"] == "reference_unavailable" and "first_frame" in out["error"]
    assert out["callback_delivered"] is True
    (delivery,) = receiver.deliveries
    assert delivery.signature_ok
    body = delivery.json()
    assert body == {
        "job_id": "cb-fail-1",
        "status": "failed",
        "assets": [],
        "error_message": out["error"],
        "metadata": {"error_code": "reference_unavailable", "retryable": False},
    }


def test_failure_callback_for_invalid_input(tiny_models, s3):
    """A job rejected at validation is a failed job too: the platform hears about it."""
    with CallbackReceiver() as receiver:
        worker = callback_worker(tiny_models, s3, receiver.url)
        out = handle(
            worker, {"id": "cb-invalid", "type": "video_fast", "prompt": "x", "width": "wide"}, job_id="rp-123"
        )
    assert out["error_code"] == "invalid_input" and "width" in out["error"]
    assert out["callback_delivered"] is True
    (delivery,) = receiver.deliveries
    body = delivery.json()
    assert delivery.signature_ok
    assert (body["job_id"], body["status"], body["assets"]) == ("cb-invalid", "failed", [])
    assert "width" in body["error_message"]


@pytest.mark.parametrize("allowed, expect_job_receiver", [("localhost", True), ("platform.example", False)])
def test_job_callback_url_only_honoured_for_allowed_hosts(tiny_models, s3, allowed, expect_job_receiver):
    with CallbackReceiver() as configured, CallbackReceiver() as from_job:
        job_url = f"http://localhost:{from_job.port}/hook"
        worker = callback_worker(tiny_models, s3, configured.url, callback_allowed_hosts=allowed)
        out = handle(worker, {**SMALL_IMAGE, "id": f"cb-allow-{expect_job_receiver}", "callback_url": job_url})
    assert out["status"] == "completed" and out["callback_delivered"] is True
    if expect_job_receiver:
        assert (len(from_job.deliveries), len(configured.deliveries)) == (1, 0)
        assert not any("callback_url" in w for w in out["warnings"])
    else:
        assert (len(from_job.deliveries), len(configured.deliveries)) == (0, 1)
        assert any("callback_url host 'localhost' is not in CALLBACK_ALLOWED_HOSTS" in w for w in out["warnings"])


def test_job_callback_url_without_configured_url_or_allowlist_sends_nothing(tiny_models, s3):
    with CallbackReceiver() as from_job:
        worker = tiny_worker(tiny_models, **s3_settings(s3), callback_secret=CALLBACK_SECRET)
        out = handle(worker, {**SMALL_IMAGE, "id": "cb-none", "callback_url": from_job.url})
    assert from_job.deliveries == []
    assert out["status"] == "completed" and "callback_delivered" not in out
    assert any("not in CALLBACK_ALLOWED_HOSTS" in w for w in out["warnings"])


def test_callback_configured_through_the_environment(tiny_models, s3):
    """``CALLBACK_URL`` + ``CALLBACK_SECRET`` through ``python handler.py --test_input``."""
    with CallbackReceiver(statuses=[503]) as receiver:
        env = worker_env(tiny_models, **s3.env(), CALLBACK_URL=receiver.url, CALLBACK_SECRET=CALLBACK_SECRET)
        code, out, logs = run_test_input({**SMALL_IMAGE, "id": "cb-env"}, env)
    assert code == 0, logs[-3000:]
    assert out["callback_delivered"] is True
    assert [d.status for d in receiver.deliveries] == [503, 200]
    assert receiver.deliveries[-1].json()["assets"][0]["url"] == "anonymous/cb-env/0.png"
