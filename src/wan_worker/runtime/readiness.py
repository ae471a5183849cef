"""Whether this worker can run a generate job now, and if not, why.

A worker that cannot serve (no weights, a failed warm-up, an unusable ``WORK_DIR``) stays up
and says so - in ``health`` and in each generate job's error - instead of exiting: on RunPod
an exit at start is a crash loop into the same failure, and a volume mounted or fixed later
could never be noticed. Model problems clear themselves: every job goes through the normal
loading path, which looks for the weights again.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from wan_worker.contract.errors import ModelUnavailable, WorkDirUnavailable, WorkerError
from wan_worker.contract.settings import Settings

if TYPE_CHECKING:
    from wan_worker.runtime.models import ModelManager

log = logging.getLogger(__name__)


def work_dir_problem(settings: Settings) -> str | None:
    """Create, write and remove a temp directory in ``WORK_DIR``: the job's encode step does the same."""
    where = settings.work_dir or Path(tempfile.gettempdir())
    try:
        with tempfile.TemporaryDirectory(prefix="wan-probe-", dir=settings.work_dir) as tmp:
            (Path(tmp) / "probe").write_bytes(b"ok")
    except OSError as exc:
        return f"WORK_DIR ({where}) is not a writable directory ({exc.strerror or type(exc).__name__})"
    return None


class Readiness:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Why the WAN model can't be used: a failed warm-up, or a job that could not load it.
        #: Cleared by the next job that completes.
        self.model_problem: str | None = None

    def reasons(self) -> list[str]:
        """Everything that stops a generate job now (empty: ready). Probes ``WORK_DIR`` afresh."""
        reasons = [self.model_problem] if self.model_problem else []
        if problem := work_dir_problem(self.settings):
            reasons.append(problem)
        return reasons

    def check_start(self) -> None:
        """Log, once at start, what health will report."""
        for reason in self.reasons():
            log.error("worker not ready; it keeps serving and reports this in health", extra={"reason": reason})

    def check_work_dir(self) -> None:
        """Fail a generate job before it spends GPU time on a result it could not write."""
        if problem := work_dir_problem(self.settings):
            raise WorkDirUnavailable(
                f"{problem}; the job was not started. Set WORK_DIR to a writable directory "
                "(unset: the system temp directory)"
            )

    def warm_up_failed(self, exc: BaseException) -> None:
        if isinstance(exc, WorkerError):
            detail = exc.message
            log.error("warm-up failed; the worker starts anyway", extra={"reason": detail})
        else:
            detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            log.exception("warm-up failed; the worker starts anyway")
        self.model_problem = f"warm-up at start failed: {detail}"

    @contextlib.contextmanager
    def loading(self, manager: ModelManager) -> Iterator[None]:
        """Around a job's model load: a WAN model that can't load makes the worker not ready."""
        try:
            yield
        except ModelUnavailable as exc:
            if not manager.wan_loaded:
                self.model_problem = exc.message
            raise

    def served(self) -> None:
        self.model_problem = None
