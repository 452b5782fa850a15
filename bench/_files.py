"""A loopback file server for the model benchmarks: serves files from a folder with ``Range``, counting the
requests and the bytes it sent per path (what comfyfleet fetched), with ``sendfile`` so the server is not
what limits the figures."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def sparse_file(path: Path, size: int, head: bytes = b"") -> str:
    """A file of ``size`` bytes that takes no disk space but ``head`` (so files differ); returns its sha256."""
    with path.open("wb") as out:
        out.write(head)
        out.truncate(size)
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class FileServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.port = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    @contextlib.contextmanager
    def running(self) -> Iterator[FileServer]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                path = owner.folder / name
                with owner._lock:
                    owner.requests[name] += 1
                if "/" in name or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start = 0
                asked = self.headers.get("Range", "")
                if asked.startswith("bytes=") and asked.endswith("-"):
                    start = int(asked[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.end_headers()
                self.wfile.flush()
                with path.open("rb") as source:
                    sent = 0
                    with contextlib.suppress(OSError):
                        while sent < size - start:
                            count = os.sendfile(
                                self.connection.fileno(), source.fileno(), start + sent, 1 << 24
                            )
                            if count == 0:
                                break
                            sent += count
                with owner._lock:
                    owner.bytes_sent[name] += sent

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, name="bench-file-server", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
