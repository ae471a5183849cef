"""Known secret values for the leak tests, and the worker's JSON logs captured in a buffer."""

from __future__ import annotations

import io
import json

from wan_worker.infra.local_s3 import SECRET_KEY as S3_SECRET

#: Known secret values put into the environment by the secret-leak tests. The bucket secret
#: is the real one of the test S3 server, so uploads keep working with it.
SECRETS = {
    "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
    "CALLBACK_SECRET": "cb-secret-7f3a9c1e5d",
    "HF_TOKEN": "hf_tokenSECRETvalue4242",
    "RUNPOD_AI_API_KEY": "rpa_APIKEYsecret9876543210",
}
CALLBACK_SECRET = SECRETS["CALLBACK_SECRET"]


class CapturedLogs:
    """The worker's real log configuration (``logs.configure``), written into a buffer."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, event: str) -> list[dict]:
        return [r for r in self.records() if r.get("event") == event]
