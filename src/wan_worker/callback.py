"""The platform's job callback: an HMAC-signed POST when a job ends, retried with backoff.

Sent only when ``CALLBACK_URL`` (or a job's ``callback_url`` whose host is in
``CALLBACK_ALLOWED_HOSTS``) and ``CALLBACK_SECRET`` are set. The signature covers the exact
bytes sent: ``X-Callback-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from .settings import Settings

log = logging.getLogger(__name__)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def callback_body(job_id: str, output: dict[str, Any]) -> dict[str, Any]:
    """The platform's contract: asset ``url``/``thumbnail_url`` are bucket-relative paths."""
    if "error" in output:
        return {
            "job_id": job_id,
            "status": "failed",
            "assets": [],
            "error_message": output["error"],
            "metadata": {"error_code": output.get("error_code"), "retryable": output.get("retryable")},
        }
    assets = [
        {
            "type": a["type"],
            "url": a.get("path") or a["url"],
            "thumbnail_url": a.get("thumbnail_path") or a["thumbnail_url"],
            "metadata": a["metadata"],
        }
        for a in output.get("assets", [])
    ]
    return {
        "job_id": job_id,
        "status": "completed",
        "assets": assets,
        "error_message": None,
        "metadata": output.get("metadata", {}),
    }


def resolve_url(settings: Settings, job_url: str | None) -> tuple[str | None, str | None]:
    """(url to use, warning). A job-supplied URL needs its host in CALLBACK_ALLOWED_HOSTS."""
    if job_url:
        try:
            parts = urlsplit(job_url)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 - raises on a port out of range
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            return settings.callback_url, "callback_url is not a valid URL; not used"
        if parts.scheme in ("http", "https") and host in settings.allowed_callback_hosts:
            return job_url, None
        return settings.callback_url, f"callback_url host '{host}' is not in CALLBACK_ALLOWED_HOSTS; not used"
    return settings.callback_url, None


def deliver(url: str, secret: str, payload: dict[str, Any], settings: Settings, sleep=time.sleep) -> bool:
    """POST with retries on 5xx, 429, timeouts and connection errors; never on other 4xx."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "X-Callback-Signature": sign(secret, body)}
    delay = 0.5
    for attempt in range(1, settings.callback_attempts + 1):
        try:
            response = requests.post(url, data=body, headers=headers, timeout=settings.callback_timeout_s)
            status = response.status_code
            if 200 <= status < 300:
                return True
            if 400 <= status < 500 and status != 429:
                log.warning("callback refused", extra={"status": status, "attempt": attempt})
                return False
            reason = f"HTTP {status}"
        except requests.RequestException as exc:
            reason = type(exc).__name__
        log.warning("callback attempt failed", extra={"reason": reason, "attempt": attempt})
        if attempt < settings.callback_attempts:
            sleep(delay)
            delay = min(delay * 2, 8.0)
    return False
