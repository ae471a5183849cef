"""A real local HTTP server that serves reference images and misbehaves on request."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def serve_on_loopback(
    handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (a free port), serving from a daemon thread.
    ``host`` may be another local address (inside the tests' network namespace, see ``netns``).
    Stop it with ``server.shutdown(); server.server_close()``."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (320, 200), mode: str = "RGB") -> bytes:
    image = Image.new(mode, size, color if mode == "RGB" else (*color, 128))
    # A diagonal stripe, so crops and orientation are visible in the pixels.
    for i in range(min(size)):
        image.putpixel((i, i), (255, 255, 255) if mode == "RGB" else (255, 255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A small file that declares a huge canvas (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class RefServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.routes: dict[str, tuple[int, str, bytes]] = {
            "/red.png": (200, "image/png", png_bytes((220, 30, 30))),
            "/blue.png": (200, "image/png", png_bytes((30, 30, 220))),
            "/green.png": (200, "image/png", png_bytes((30, 200, 30), (200, 320))),
            "/alpha.png": (200, "image/png", png_bytes((10, 120, 10), mode="RGBA")),
            "/notimage": (200, "text/html", b"<html>hello</html>"),
            "/bomb.png": (200, "image/png", bomb_png()),
            "/big.png": (200, "image/png", b"\x89PNG" + b"0" * (3 * 1024 * 1024)),
        }
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server.hits.append(self.path)
                if self.path == "/hang":
                    time.sleep(30)
                    return
                if self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b"0")
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:  # the client gave up, as it should
                        pass
                    return
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                    return
                status, ctype, body = server.routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = serve_on_loopback(Handler, host, port)
        self.port = self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
