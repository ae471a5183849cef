"""Object storage: S3-compatible upload with retries and presigned URLs, or small inline data.

Keys are ``{user_id or "anonymous"}/{job_id}/0.mp4`` (or ``0.png``) and ``0.thumb.webp``,
relative to the bucket (the platform's callback contract). With no bucket configured,
assets come back as base64 data URIs, only up to ``INLINE_MAX_BYTES`` in total.

Each object records the RunPod job that wrote it (``x-amz-meta-runpod-job-id``). A retry of
the same RunPod job overwrites its own objects; a different RunPod job reusing the ``id``
never overwrites them: it stores under ``{job_id}-{8 hex of its RunPod job id}`` and says so.
A job whose upload fails removes what it had uploaded (best effort), and its error says
whether anything is left.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from wan_worker.contract.errors import ErrorCode, StorageError
from wan_worker.contract.settings import Settings

log = logging.getLogger(__name__)

#: S3 user metadata naming the RunPod job that wrote an object.
OWNER_META = "runpod-job-id"


@dataclass(frozen=True)
class StoredObject:
    url: str
    path: str | None  # bucket-relative key; None when inlined


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            self._client = boto3.client(
                "s3",
                endpoint_url=s.bucket_endpoint_url,
                aws_access_key_id=s.bucket_access_key_id.get_secret_value(),
                aws_secret_access_key=s.bucket_secret_access_key.get_secret_value(),
                region_name=s.bucket_region,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    connect_timeout=min(10.0, s.upload_timeout_s),
                    read_timeout=s.upload_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},  # we retry whole uploads ourselves
                ),
            )
        return self._client

    @staticmethod
    def key(user_id: str | None, job_id: str, filename: str) -> str:
        return f"{user_id or 'anonymous'}/{job_id}/{filename}"

    def job_prefix(self, user_id: str | None, job_id: str, owner: str, filenames: list[str]) -> tuple[str, str | None]:
        """Where a job's files go: ``{user_id}/{job_id}``, unless a different RunPod job already
        stored any of ``filenames`` there; then a prefix of this RunPod job's own, and a warning."""
        prefix = self.key(user_id, job_id, "").rstrip("/")
        if not self.settings.bucket_configured:
            return prefix, None
        others = {o for name in filenames if (o := self._owner(f"{prefix}/{name}")) not in (None, owner)}
        if not others:
            return prefix, None
        own = f"{prefix}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"
        log.warning("job id already used by another RunPod job", extra={"key_prefix": prefix, "stored_under": own})
        return own, (
            f"id '{job_id}' already has results stored by another RunPod job under {prefix}/; they were left "
            f"untouched and this job's are under {own}/ (see assets[].path)"
        )

    def _owner(self, key: str) -> str | None:
        """The RunPod job that wrote ``key`` ("" if unknown), or None when there is no such object.

        A failed check counts as "no object": the upload's own retries then report a broken store.
        """
        try:
            head = self.client.head_object(Bucket=self.settings.bucket_name, Key=key)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchKey", "NotFound"):
                log.warning("existence check failed", extra={"key": key, "reason": code or type(exc).__name__})
            return None
        return head.get("Metadata", {}).get(OWNER_META, "")

    def store(self, files: list[tuple[Path, str, str]], owner: str | None = None) -> list[StoredObject]:
        """Upload ``(path, key, content_type)`` items, or inline them when no bucket is set.

        ``owner`` (the RunPod job id) is recorded on each object. If an upload fails, the
        objects already uploaded are deleted again and the error says what, if anything, is left.
        """
        if not self.settings.bucket_configured:
            return self._inline(files)
        stored: list[StoredObject] = []
        for path, key, content_type in files:
            try:
                stored.append(self._upload(path, key, content_type, owner))
            except StorageError as exc:
                raise self._undo(exc, [o.path for o in stored if o.path], key) from None
        return stored

    def _undo(self, exc: StorageError, uploaded: list[str], failed_key: str) -> StorageError:
        """Delete a failed job's objects (best effort); the error names any that remain."""
        left = []
        for key in [*uploaded, failed_key]:  # the failed one too: a PUT may land after its timeout
            try:
                self.client.delete_object(Bucket=self.settings.bucket_name, Key=key)
            except Exception as delete_exc:  # noqa: BLE001 - botocore raises many types
                log.warning("cleanup delete failed", extra={"key": key, "reason": type(delete_exc).__name__})
                if key in uploaded:
                    left.append(key)
        if left:
            note = f"; left in the bucket (could not delete): {', '.join(left)}"
        elif uploaded:
            note = f"; the already uploaded {', '.join(uploaded)} was deleted again: nothing of this job is stored"
        else:
            note = ""
        return StorageError(
            exc.message + note,
            code=exc.code,
            retryable=exc.retryable,
            details={**exc.details, "left_in_bucket": left},
        )

    def _upload(self, path: Path, key: str, content_type: str, owner: str | None = None) -> StoredObject:
        s = self.settings
        extra = {"Metadata": {OWNER_META: owner}} if owner else {}
        delay = 0.5
        for attempt in range(1, s.upload_attempts + 1):
            try:
                with path.open("rb") as body:
                    self.client.put_object(Bucket=s.bucket_name, Key=key, Body=body, ContentType=content_type, **extra)
                self.client.head_object(Bucket=s.bucket_name, Key=key)  # the asset exists before we say so
                break
            except Exception as exc:  # noqa: BLE001 - botocore raises many types; all are retried
                code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")  # timeouts: None
                if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(
                        f"upload of {key} refused by storage ({code}); check BUCKET_NAME and the bucket credentials",
                        retryable=False,
                    ) from None
                log.warning(
                    "upload attempt failed",
                    extra={"key": key, "attempt": attempt, "reason": code or type(exc).__name__},
                )
                if attempt == s.upload_attempts:
                    raise StorageError(
                        f"upload of {key} failed after {attempt} attempts ({type(exc).__name__}); the job's assets "
                        "were not stored"
                    ) from None
                time.sleep(delay)
                delay *= 2
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": s.bucket_name, "Key": key}, ExpiresIn=s.presign_expiry_s
        )
        return StoredObject(url=url, path=key)

    def _inline(self, files: list[tuple[Path, str, str]]) -> list[StoredObject]:
        total = sum(path.stat().st_size for path, _, _ in files)
        cap = self.settings.inline_max_bytes
        if total > cap:
            raise StorageError(
                f"no bucket is configured and the result ({total} bytes) is over the inline cap of {cap} bytes; "
                "set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY (and BUCKET_NAME)",
                code=ErrorCode.STORAGE_NOT_CONFIGURED,
                retryable=False,
            )
        return [
            StoredObject(url=f"data:{ctype};base64,{base64.b64encode(path.read_bytes()).decode()}", path=None)
            for path, _, ctype in files
        ]
