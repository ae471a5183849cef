"""Errors the worker turns into a clear, structured failure for the caller."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every ``error_code`` a job can fail with; the README's table lists exactly these."""

    INVALID_INPUT = "invalid_input"
    REFERENCE_UNAVAILABLE = "reference_unavailable"
    MODEL_UNAVAILABLE = "model_unavailable"
    WORK_DIR_UNAVAILABLE = "work_dir_unavailable"
    STORAGE_ERROR = "storage_error"
    STORAGE_NOT_CONFIGURED = "storage_not_configured"
    JOB_TIMEOUT = "job_timeout"
    JOB_TOO_LONG = "job_too_long"
    OUT_OF_MEMORY = "out_of_memory"
    CUDA_ERROR = "cuda_error"
    DISK_FULL = "disk_full"
    GENERATION_FAILED = "generation_failed"
    INTERNAL_ERROR = "internal_error"


class WorkerError(Exception):
    """A failure with a stable ``error_code`` and a message fit to show the platform's user.

    ``retryable`` tells the platform whether submitting the same job again may succeed.
    ``refresh_worker`` asks RunPod to restart this worker after the job (CUDA faults).
    """

    code = ErrorCode.INTERNAL_ERROR
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
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
        out: dict[str, Any] = {"error": self.message, "error_code": str(self.code), "retryable": self.retryable}
        if self.field:
            out["field"] = self.field
        if self.details:
            out["details"] = self.details
        if self.refresh_worker:
            out["refresh_worker"] = True
        return out


class InvalidInput(WorkerError):
    code = ErrorCode.INVALID_INPUT


class ReferenceUnavailable(WorkerError):
    """A reference image could not be used (and ``strict_references`` asked to fail)."""

    code = ErrorCode.REFERENCE_UNAVAILABLE


class ModelUnavailable(WorkerError):
    code = ErrorCode.MODEL_UNAVAILABLE


class StorageError(WorkerError):
    code = ErrorCode.STORAGE_ERROR
    retryable = True


class JobTimeout(WorkerError):
    code = ErrorCode.JOB_TIMEOUT
    retryable = True


class GenerationFailed(WorkerError):
    code = ErrorCode.GENERATION_FAILED


class WorkDirUnavailable(WorkerError):
    """``WORK_DIR`` is missing or not writable: the job would fail after generating."""

    code = ErrorCode.WORK_DIR_UNAVAILABLE
    retryable = True
