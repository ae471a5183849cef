"""The platform's job callback: an HMAC-signed POST when a job ends, retried with backoff.

Sent only when ``CALLBACK_URL`` (or a job's ``callback_url`` whose host is in
``CALLBACK_ALLOWED_HOSTS``) and ``CALLBACK_SECRET`` are set. Delivery goes through ``net``
(strict parse, pinned address, one deadline for all attempts); redirects are not followed. The signature covers the exact
bytes sent: ``X-Callback-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from wan_worker.contract.settings import Settings
from wan_worker.infra import net

log = logging.getLogger(__name__)

#: Extra time a job already past its deadline gets to report its result.
LATE_JOB_GRACE_S = 2.0


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
            target = net.parse_url(job_url)
        except net.OutboundError:
            return settings.callback_url, "callback_url is not a valid URL; not used"
        if host_allowed(target, settings.allowed_callback_hosts):
            return job_url, None
        return settings.callback_url, f"callback_url host '{target.host}' is not in CALLBACK_ALLOWED_HOSTS; not used"
    return settings.callback_url, None


def host_allowed(target: net.Target, entries: frozenset[str]) -> bool:
    """``host`` allows that host on any port; ``host:port`` (``[v6]:port``) only on that port."""
    for entry in entries:
        host, port = _allow_entry(entry)
        if host == target.host.rstrip(".") and port in (None, target.port):
            return True
    return False


def _allow_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        literal, _, after = entry[1:].partition("]")
        host = _canonical_ip(literal)
        port_text = after[1:] if after.startswith(":") else ""
    else:
        host, _, port_text = entry.partition(":")
    return host.rstrip("."), int(port_text) if port_text.isdigit() else None


def _canonical_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def deliver(
    url: str,
    secret: str,
    payload: dict[str, Any],
    settings: Settings,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
) -> bool:
    """POST with retries on 5xx, 429, timeouts and connection errors; never on other 4xx or 3xx.

    All attempts and backoff end within ``CALLBACK_TIMEOUT_S`` and before the job's
    ``deadline`` (a ``time.monotonic()`` value). A job already past its deadline still gets
    up to ``LATE_JOB_GRACE_S`` so that the platform hears about a timed-out job.
    Redirects are never followed: a receiver's 3xx counts as a refusal.
    """
    try:
        target = net.parse_url(url)
    except net.OutboundError as exc:
        log.warning("callback URL refused", extra={"reason": str(exc)})
        return False
    now = time.monotonic()
    end = now + settings.callback_timeout_s
    if deadline is not None:
        end = min(end, max(deadline, now + min(settings.callback_timeout_s, LATE_JOB_GRACE_S)))
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "X-Callback-Signature": sign(secret, body)}
    delay = 0.5
    for attempt in range(1, settings.callback_attempts + 1):
        try:
            # The operator chose the receiver (CALLBACK_URL or CALLBACK_ALLOWED_HOSTS), so a
            # private address is allowed; the address is still pinned to the one lookup.
            response = net.send("POST", target, end=end, allow_private=True, max_bytes=None, body=body, headers=headers)
            status = response.status
            if 200 <= status < 300:
                return True
            if 300 <= status < 400 or (400 <= status < 500 and status != 429):
                log.warning("callback refused", extra={"status": status, "attempt": attempt})
                return False
            reason = f"HTTP {status}"
        except net.OutboundError as exc:
            reason = str(exc)
        log.warning("callback attempt failed", extra={"reason": reason, "attempt": attempt})
        left = end - time.monotonic()
        if attempt == settings.callback_attempts or left <= 0:
            break
        sleep(min(delay, left))
        delay = min(delay * 2, 8.0)
    return False
