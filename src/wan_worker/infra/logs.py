"""Structured JSON logs: one object per line, with the job id, and secrets redacted.

The redaction filter runs on every record of every logger, so a secret that reaches a
message by accident - an exception text, a URL - is masked. The RunPod SDK's own logger
does not use ``logging``: it ``print``s. So ``configure`` also wraps ``sys.stdout`` and
``sys.stderr`` in a stream that masks the same values in whatever is written to them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
REDACTED = "[REDACTED]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; any time it formats (``formatTime``) is UTC. The converter
    is this class's own, so other formatters in the process keep theirs."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (job_id := job_id_var.get()) is not None:
            entry["job_id"] = job_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
            for key, value in list(vars(record).items()):
                if key not in _RESERVED and isinstance(value, str):
                    setattr(record, key, self.redact(value))
            if record.exc_info:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class RedactingStream:
    """A text stream that masks secrets in each ``write`` and forwards everything else.

    ``print`` writes the message in one call, so a secret inside one printed message is
    always masked; only a secret split across separate writes could pass.
    """

    def __init__(self, stream: Any, redact: RedactSecrets) -> None:
        self._stream = stream
        self._redact = redact

    def write(self, text: str) -> int:
        self._stream.write(self._redact.redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def redact_std_streams(redact: RedactSecrets) -> None:
    """Route ``sys.stdout``/``sys.stderr`` through ``RedactingStream`` (once; later calls update the secrets)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RedactingStream):
            stream._redact = redact
        elif stream is not None:
            setattr(sys, name, RedactingStream(stream, redact))


def configure(level: str, secrets: list[str], runpod_level: str = "INFO") -> None:
    redact = RedactSecrets(secrets)
    if redact.secrets:
        redact_std_streams(redact)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(redact)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from runpod.serverless.modules.rp_logger import RunPodLogger
    except ImportError:  # the benchmark runs the worker without the RunPod SDK
        return
    RunPodLogger().set_level(runpod_level)
