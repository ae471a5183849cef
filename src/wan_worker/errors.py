"""Errors the worker turns into a clear, structured failure for the caller."""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    """A failure with a stable ``error_code`` and a message fit to show the platform's user.

    ``retryable`` tells the platform whether submitting the same job again may succeed.
    ``refresh_worker`` asks RunPod to restart this worker after the job (CUDA faults).
    """

    code = "internal_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        field: str | None = None,
        refresh_worker: bool = False,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.retryable = self.retryable if retryable is None else retryable
        self.field = field
        self.refresh_worker = refresh_worker
        self.details = details or {}

    def to_output(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "error_code": self.code, "retryable": self.retryable}
        if self.field:
            out["field"] = self.field
        if self.details:
            out["details"] = self.details
        if self.refresh_worker:
            out["refresh_worker"] = True
        return out


class InvalidInput(WorkerError):
    code = "invalid_input"


class ReferenceUnavailable(WorkerError):
    """A reference image could not be used (and ``strict_references`` asked to fail)."""

    code = "reference_unavailable"


class ModelUnavailable(WorkerError):
    code = "model_unavailable"


class StorageError(WorkerError):
    code = "storage_error"
    retryable = True


class JobTimeout(WorkerError):
    code = "job_timeout"
    retryable = True


class GenerationFailed(WorkerError):
    code = "generation_failed"
