"""A quiet loopback HTTP server for a folder, with special paths that misbehave on purpose.

``with serve_folder(folder) as base_url: ...`` serves ``folder`` at ``http://127.0.0.1:<free port>``
(a ``ThreadingHTTPServer`` in a daemon thread, stopped and joined on exit). Under ``/_fault/`` the server
answers badly, for tests of bad input (``<path>`` is a file path inside the folder):

==================================  ==================================================================
``/_fault/404/<path>``              404 Not Found
``/_fault/500/<path>``              500 Internal Server Error
``/_fault/slow/<seconds>/<path>``   the file, after sleeping ``seconds`` (float, at most 60)
``/_fault/html/<path>``             302 redirect to an HTML page served as ``text/html`` with status 200
``/_fault/truncated/<path>``        the first half of the file, with a matching Content-Length (a broken image)
``/_fault/cut/<path>``              announces the full Content-Length, sends half, closes the connection
``/_fault/text/<path>``             the file's bytes labelled ``text/plain``
==================================  ==================================================================

:func:`fault_url` builds these URLs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

FAULTS: tuple[str, ...] = ("404", "500", "slow", "html", "truncated", "cut", "text")
_HTML = b"<!doctype html><html><head><title>Not an image</title></head><body><p>This is a web page.</p></body></html>"


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files without request logging, plus the ``/_fault/`` paths."""

    def log_message(self, format, *args):  # noqa: A002 - signature from BaseHTTPRequestHandler
        pass

    def _file(self, rel: str) -> bytes | None:
        root = Path(self.directory).resolve()
        path = (root / unquote(rel)).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path.read_bytes()

    def _send(self, status: int, body: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server naming
        if not self.path.startswith("/_fault/"):
            return super().do_GET()
        parts = self.path[len("/_fault/"):].split("?", 1)[0].split("/")
        kind, rest = parts[0], parts[1:]
        if kind == "page.html":
            return self._send(200, _HTML, "text/html; charset=utf-8")
        if kind not in FAULTS:
            return self._send(400, f"unknown fault {kind!r}; valid: {FAULTS}".encode(), "text/plain")
        if kind == "slow":
            delay, rest = min(float(rest[0]), 60.0), rest[1:]
            time.sleep(delay)
        if kind == "404":
            return self._send(404, b"not found", "text/plain")
        if kind == "500":
            return self._send(500, b"server error", "text/plain")
        if kind == "html":
            self.send_response(302)
            self.send_header("Location", "/_fault/page.html")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        body = self._file("/".join(rest))
        if body is None:
            return self._send(404, b"not found", "text/plain")
        ctype = self.guess_type("/".join(rest))
        if kind == "truncated":
            return self._send(200, body[: len(body) // 2], ctype)
        if kind == "cut":
            self._send(200, body[: len(body) // 2], ctype, length=len(body))
            self.close_connection = True
            return None
        if kind == "text":
            return self._send(200, body, "text/plain")
        return self._send(200, body, ctype)  # slow


def fault_url(base_url: str, kind: str, rel_path: str, seconds: float = 2.0) -> str:
    """The URL under ``base_url`` that serves ``rel_path`` with the given fault (see the module table)."""
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; valid: {FAULTS}")
    middle = f"slow/{seconds:g}" if kind == "slow" else kind
    return f"{base_url.rstrip('/')}/_fault/{middle}/{rel_path.lstrip('/')}"


@contextlib.contextmanager
def serve_folder(folder: str | Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) for the ``with`` block; yields the base URL (no trailing slash)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot serve {folder}: not a folder")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"serve:{folder.name}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
