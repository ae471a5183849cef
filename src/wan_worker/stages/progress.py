"""Throttled progress through RunPod's progress API.

Each stage owns a slice of 0-100 %. Stage changes are always sent; denoising steps are
sent at most once per ``min_interval`` seconds (and always on the last step), so a fast
worker does not flood the job queue with IN_PROGRESS posts. In a local run there is no job
API to post to, so progress only goes to the log (at debug level). A ``JobObserver`` sees
every stage and every step, unthrottled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wan_worker.stages.observer import NO_OBSERVER, JobObserver

if TYPE_CHECKING:
    from wan_worker.contract.settings import Settings

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[int, int]] = {
    "validating": (0, 2),
    "fetching_references": (2, 4),
    "loading": (4, 10),
    "enhancing": (10, 15),
    "generating": (17, 88),
    "encoding": (88, 94),
    "uploading": (94, 100),
}

Sender = Callable[[dict[str, Any]], None]


def runpod_sender(job: dict[str, Any], settings: Settings) -> Sender:
    if not settings.job_api_available:
        return lambda payload: log.debug("progress", extra={"progress": payload})
    import runpod

    def send(payload: dict[str, Any]) -> None:
        try:
            runpod.serverless.progress_update(job, payload)
        except Exception as exc:  # noqa: BLE001 - progress must never fail a job
            log.warning("progress update failed", extra={"reason": type(exc).__name__})

    return send


class Progress:
    def __init__(
        self,
        send: Sender,
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        observer: JobObserver = NO_OBSERVER,
    ) -> None:
        self._send = send
        self.observer = observer
        self._min_interval = min_interval
        self._clock = clock
        self._last_sent = -1e9
        self._stage_started = clock()
        self.stage = "validating"
        self._segment: dict[str, Any] | None = None

    def enter(self, stage: str, **extra: Any) -> None:
        self.stage = stage
        self._stage_started = self._clock()
        self.observer.stage_started(stage)
        self._emit({"stage": stage, "percentage": STAGES[stage][0], **extra})

    def segment(self, index: int, count: int, *, done: float, share: float, later_seconds: float) -> None:
        """Enter segment ``index`` (0-based) of a long video. Its steps span ``share`` of the
        generating slice after the fraction ``done``; ``later_seconds`` estimates the work
        after this segment, so each step also reports the whole job's ETA."""
        self._segment = {"index": index, "count": count, "done": done, "share": share, "later": later_seconds}
        self._stage_started = self._clock()

    def step(self, current: int, total: int) -> None:
        self.observer.step_finished(current, total)
        now = self._clock()
        if current < total and now - self._last_sent < self._min_interval:
            return
        lo, hi = STAGES["generating"]
        elapsed = now - self._stage_started
        eta = elapsed / current * (total - current) if current else None
        seg = self._segment
        share = (hi - lo) * current / max(total, 1)
        if seg:
            share = (hi - lo) * (seg["done"] + seg["share"] * current / max(total, 1))
        payload = {
            "stage": "generating",
            "percentage": round(lo + share, 1),
            "step": current,
            "total_steps": total,
            "eta_seconds": round(eta, 1) if eta is not None else None,
        }
        if seg:
            payload.update(
                segment=seg["index"] + 1,
                segments=seg["count"],
                job_eta_seconds=round((eta or 0.0) + seg["later"], 1),
            )
        self._emit(payload)

    def _emit(self, payload: dict[str, Any]) -> None:
        self._last_sent = self._clock()
        self._send(payload)
