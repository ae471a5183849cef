"""Object storage: S3-compatible upload with retries and presigned URLs, or small inline data.

Keys are ``{user_id or "anonymous"}/{job_id}/0.mp4`` (or ``0.png``) and ``0.thumb.webp``,
relative to the bucket (the platform's callback contract). With no bucket configured,
assets come back as base64 data URIs, only up to ``INLINE_MAX_BYTES`` in total.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StorageError
from .settings import Settings

log = logging.getLogger(__name__)


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

    def store(self, files: list[tuple[Path, str, str]]) -> list[StoredObject]:
        """Upload ``(path, key, content_type)`` items, or inline them when no bucket is set."""
        if not self.settings.bucket_configured:
            return self._inline(files)
        return [self._upload(path, key, content_type) for path, key, content_type in files]

    def _upload(self, path: Path, key: str, content_type: str) -> StoredObject:
        s = self.settings
        delay = 0.5
        for attempt in range(1, s.upload_attempts + 1):
            try:
                with path.open("rb") as body:
                    self.client.put_object(Bucket=s.bucket_name, Key=key, Body=body, ContentType=content_type)
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
                code="storage_not_configured",
                retryable=False,
            )
        return [
            StoredObject(url=f"data:{ctype};base64,{base64.b64encode(path.read_bytes()).decode()}", path=None)
            for path, _, ctype in files
        ]
