"""The platform's callback receiver, for real: it checks each delivery's signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from .logcapture import CALLBACK_SECRET
from .refserver import serve_on_loopback


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    status: int  # what the receiver answered

    def json(self) -> dict:
        return json.loads(self.body)


class CallbackReceiver:
    """The platform's edge function, for real: verifies ``X-Callback-Signature`` (HMAC-SHA256
    of the raw body) and counts deliveries. ``statuses`` are answered in order, then 200.
    A delivery with a bad signature gets 401, as the platform would answer.
    """

    def __init__(self, secret: str = CALLBACK_SECRET, statuses: list[int] | tuple[int, ...] = ()) -> None:
        self.secret = secret
        self.statuses = list(statuses)
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(self.headers.get("X-Callback-Signature", ""), expected)
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if not ok:
                        status = 401
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers), body, ok, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = serve_on_loopback(Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/functions/v1/job-callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CallbackReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
