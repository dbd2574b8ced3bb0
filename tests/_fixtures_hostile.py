"""A hostile image server on 127.0.0.1: every path answers badly in its own way, and every request is counted.

``with hostile_server(max_seconds=60) as srv:`` serves ``srv.url(kind)`` for each kind in ``KINDS`` and
``srv.requests`` counts requests per path. The server stops when the ``with`` block ends, and by itself
after ``max_seconds`` whatever the test does (a daemon timer shuts it down), so it can never outlive a test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from PIL import Image

from tests._fixtures_curate import bomb_png, color_image, png_bytes

GOOD = png_bytes(color_image(3))
# kind -> what the server does (the README's table of bad input lists the same kinds)
KINDS = {
    "good": "200, a PNG",
    "good2": "200, another PNG",
    "same_bytes": "200, the very bytes of `good` under another URL",
    "404": "404 Not Found",
    "403": "403 Forbidden",
    "500": "500 Internal Server Error",
    "503": "503 Service Unavailable",
    "slow": "sleeps past the timeout before answering",
    "loop": "302 to itself, forever",
    "to_file": "302 to file:///etc/passwd",
    "to_ftp": "302 to ftp://127.0.0.1/x.png",
    "to_private": "302 to http://127.0.0.2/ (a loopback address outside the allowed 127.0.0.1/32)",
    "to_metadata": "302 to http://169.254.169.254/latest/meta-data/ (a cloud metadata endpoint)",
    "html": "200 text/html page",
    "truncated": "200, the first half of a PNG",
    "cut": "announces the full Content-Length, sends half, closes",
    "empty": "200 with an empty body",
    "huge_header": "Content-Length above max_image_bytes",
    "endless": "no Content-Length, streams bytes until the client gives up",
    "bomb": "200, a small PNG of 4000x4000 pixels (a decompression bomb)",
    "tiny": "200, a 2x2 PNG (below min_image_size)",
    "garbage": "answers with bytes that are not HTTP",
    "hangup": "closes the connection without answering",
    "robots": "200, a PNG with X-Robots-Tag: noai",
}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802, C901 - one branch per kind of bad answer
        path = self.path.split("?", 1)[0]
        self.server.requests[path] += 1
        kind = path.strip("/").split("/")[0]
        if kind in ("good", "same_bytes"):
            return self._send(200, GOOD)
        if kind == "good2" or kind == "slowgood":
            if kind == "slowgood":
                time.sleep(self.server.slow_good_s)
            seed = int(path.rsplit("/", 1)[-1]) if path.rsplit("/", 1)[-1].isdigit() else 4
            return self._send(200, png_bytes(color_image(seed)))
        if kind in ("404", "403", "500", "503"):
            return self._send(int(kind), b"no", "text/plain")
        if kind == "slow":
            time.sleep(self.server.slow_s)
            return self._send(200, GOOD)
        if kind == "loop":
            return self._redirect(path)
        if kind == "to_file":
            return self._redirect("file:///etc/passwd")
        if kind == "to_ftp":
            return self._redirect("ftp://127.0.0.1/x.png")
        if kind == "to_private":
            return self._redirect(f"http://127.0.0.2:{self.server.server_address[1]}/good")
        if kind == "to_metadata":
            return self._redirect("http://169.254.169.254/latest/meta-data/")
        if kind == "html":
            return self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
        if kind == "truncated":
            return self._send(200, GOOD[: len(GOOD) // 2])
        if kind == "cut":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD[: len(GOOD) // 2])
            self.close_connection = True
            return None
        if kind == "empty":
            return self._send(200, b"")
        if kind == "huge_header":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(GOOD)
            self.close_connection = True
            return None
        if kind == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.close_connection = True
            deadline = time.monotonic() + 10  # bounded even if the client keeps reading
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    self.wfile.write(b"\0" * 65536)
            return None
        if kind == "bomb":
            return self._send(200, self.server.bomb)
        if kind == "tiny":
            return self._send(200, png_bytes(Image.new("RGB", (2, 2), (200, 10, 10))))
        if kind == "garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH_9.0\r\nthis is not http\r\n\r\n")
            self.close_connection = True
            return None
        if kind == "hangup":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if kind == "robots":
            return self._send(200, png_bytes(color_image(5)), headers={"X-Robots-Tag": "noai"})
        return self._send(404, b"unknown kind", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, slow_s: float, slow_good_s: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: Counter = Counter()
        self.slow_s, self.slow_good_s = slow_s, slow_good_s
        self.bomb = bomb_png(4000)

    def handle_error(self, request, client_address):  # clients that hang up mid-answer are the point here
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, kind: str, suffix: str = "") -> str:
        return f"{self.base}/{kind}" + (f"/{suffix}" if suffix else "")


@contextlib.contextmanager
def hostile_server(max_seconds: float = 120, slow_s: float = 3.0, slow_good_s: float = 0.0) -> Iterator[_Server]:
    """The server for the ``with`` block, stopped after ``max_seconds`` at the latest."""
    srv = _Server(slow_s, slow_good_s)
    thread = threading.Thread(target=srv.serve_forever, name="hostile-server", daemon=True)
    thread.start()
    timer = threading.Timer(max_seconds, srv.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield srv
    finally:
        timer.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
