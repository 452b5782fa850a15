"""A loopback file server that counts its requests: serves files with ``Range``, answers 404 for unknown
paths, can cut a download after some bytes (``cut_after``) or hold it at a byte count until released
(``hold_at``), and redirects (``redirects``)."""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: Counter[str] = Counter()
        self.ranges: dict[str, list[str | None]] = {}  # path -> the Range header of each GET
        self.cut_after: dict[str, int] = {}  # path -> bytes after which the next GET closes the connection
        self.hold_at: dict[str, int] = {}  # path -> bytes after which GETs wait for ``release``
        self.holding = threading.Event()  # a GET is waiting at hold_at
        self.release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path.lstrip("/")
                owner.requests[path] += 1
                owner.ranges.setdefault(path, []).append(self.headers.get("Range"))
                if path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                asked = self.headers.get("Range")
                if asked and asked.startswith("bytes=") and asked.endswith("-"):
                    start = int(asked[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                cut = owner.cut_after.pop(path, None)
                hold = owner.hold_at.get(path)
                if hold is not None and hold > start:
                    self.wfile.write(rest[: hold - start])
                    self.wfile.flush()
                    owner.holding.set()
                    owner.release.wait(30)
                    rest = rest[hold - start :]
                if cut is not None:
                    self.wfile.write(rest[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        server = _QuietServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        thread = threading.Thread(target=server.serve_forever, name="file-server", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client that went away in the middle of a body (a killed comfyfleet) is expected here, not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]
