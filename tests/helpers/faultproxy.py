"""A fault-injecting HTTP proxy, for S3 failures and slowness that really happen on the wire."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from .refserver import serve_on_loopback


class FaultProxy:
    """A real HTTP proxy in front of ``upstream`` (e.g. SeaweedFS S3) that injects faults.

    Requests pass through byte for byte (the Host header too, so SigV4 signatures stay
    valid). ``fail`` answers the next N matching requests with a 500 S3 error;
    ``delay_s`` sleeps before forwarding the next ``delay_count`` matching requests.
    ``methods`` limits the faults to some HTTP methods (default: all); ``match``, a predicate
    on (method, path), limits them further.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fail = 0
        self.delay_s = 0.0
        self.delay_count = 0
        self.methods: set[str] | None = None
        self.match: Callable[[str, str], bool] | None = None
        self.log: list[tuple[str, str, int]] = []  # (method, path, status), once answered
        self.requests: list[tuple[str, str]] = []  # (method, path), as they arrive
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = bytearray()
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                                raw += trailer
                            raw += b"\r\n"
                            return bytes(raw)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                import http.client

                body = self._read_body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    matches = (proxy.methods is None or self.command in proxy.methods) and (
                        proxy.match is None or proxy.match(self.command, self.path)
                    )
                    fail = matches and proxy.fail > 0
                    if fail:
                        proxy.fail -= 1
                    delay = proxy.delay_s if matches and proxy.delay_count > 0 else 0.0
                    if delay:
                        proxy.delay_count -= 1
                if delay:
                    time.sleep(delay)
                if fail:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                        b"<Message>injected fault</Message></Error>"
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    proxy.log.append((self.command, self.path, 500))
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        conn.putheader(name, value)
                    conn.endheaders(body or None)
                    response = conn.getresponse()
                    data = response.read()
                except OSError:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    proxy.log.append((self.command, self.path, 502))
                    return
                finally:
                    conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.log.append((self.command, self.path, response.status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = serve_on_loopback(Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
