"""Where model bytes come from: http(s) URLs, ``s3://bucket/key`` and model files uploaded through the API.

Every source appends to a :class:`PartFile` (the cache's ``.part`` file, hashed as it grows), resuming where
an earlier try stopped when it can (``Range`` for http(s) and s3) and starting over when it cannot. A source
sorts its failures: :class:`ModelFetchError` is transient (a cut connection, a 5xx, a timeout: the cache tries
again, resuming), :class:`ModelUnavailable` is final (a 404, a refused address, a file over the size cap).

http(s) requests follow the address rules of input URLs (``comfyfleet.net``): no loopback, private or
link-local host unless the pool allows it, each redirect hop checked the same way and the request pinned to
the address that was checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urljoin, urlsplit

import httpx

from comfyfleet.models.spec import ModelFetchError, ModelSpec, ModelUnavailable
from comfyfleet.net import UnsafeAddress, pin_public_address
from comfyfleet.redaction import redact

MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
PRIVATE_HINT = "set models_allow_private on the pool to allow it"

Progress = Callable[[int, int | None], None]  # bytes so far, total when known


class PartFile:
    """A download in progress: ``<cache>/partial/<sha256>.part``, with the sha256 of what it holds so far, so
    a resumed download is verified as a whole without reading the file twice. Open from :meth:`open` to
    :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hash = hashlib.sha256()
        self.size = 0
        self._file: BinaryIO | None = None

    def open(self) -> None:
        """Hash what an earlier try left, and append from there."""
        self._file = self.path.open("a+b")
        self._file.seek(0)
        self._hash = hashlib.sha256()
        while chunk := self._file.read(1024 * 1024):
            self._hash.update(chunk)
        self.size = self._file.tell()

    def _handle(self) -> BinaryIO:
        if self._file is None:
            raise ValueError(f"{self.path} is not open")
        return self._file

    def restart(self) -> None:
        """The source cannot resume: drop what was there."""
        handle = self._handle()
        handle.seek(0)
        handle.truncate()
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        handle = self._handle()
        handle.write(chunk)
        handle.flush()  # what arrived is in the file at once: a crash loses nothing that was received
        self._hash.update(chunk)
        self.size += len(chunk)

    def seal(self) -> str:
        """Flush to disk and return the sha256 (hex) of the whole file."""
        handle = self._handle()
        handle.flush()
        os.fsync(handle.fileno())
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Source(Protocol):
    async def fill(self, spec: ModelSpec, part: PartFile, *, allow_private: bool, progress: Progress) -> None:
        """Append ``spec``'s bytes to ``part`` (resuming at ``part.size`` when possible)."""


AssetReader = Callable[[str], AsyncIterator[bytes]]
"""The bytes of the uploaded model file with this sha256; raises :class:`ModelUnavailable` when none."""


class HttpSource:
    def __init__(self, client: httpx.AsyncClient, *, max_bytes: int) -> None:
        self._client = client
        self._max_bytes = max_bytes

    async def fill(self, spec: ModelSpec, part: PartFile, *, allow_private: bool, progress: Progress) -> None:
        url = spec.url
        for _ in range(MAX_REDIRECTS + 1):
            shown = redact(url)  # kept on the task and logged: not the URL's token
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ModelUnavailable(f"model URL {shown!r} redirected to a URL that is not http(s)")
            try:
                target = await pin_public_address(
                    url, allow_private=allow_private, label="model URL", hint=PRIVATE_HINT
                )
            except UnsafeAddress as exc:
                raise ModelUnavailable(str(exc)) from exc
            headers = dict(target.headers)
            if part.size:
                headers["Range"] = f"bytes={part.size}-"
            try:
                async with self._client.stream(
                    "GET", target.url, headers=headers, extensions=target.extensions, follow_redirects=False
                ) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise ModelUnavailable(f"model URL {shown!r} redirected without a Location")
                        url = urljoin(url, location)
                        continue
                    total = self._start(response, part, shown)
                    async for chunk in response.aiter_bytes():
                        part.write(chunk)
                        if part.size > self._max_bytes:
                            raise ModelUnavailable(
                                f"model URL {shown!r} is larger than {self._max_bytes} bytes"
                            )
                        progress(part.size, total)
                    return
            except httpx.HTTPError as exc:
                raise ModelFetchError(
                    f"model URL {shown!r}: {redact(str(exc)) or type(exc).__name__}"
                ) from exc
        raise ModelUnavailable(f"model URL {redact(spec.url)!r} followed more than {MAX_REDIRECTS} redirects")

    def _start(self, response: httpx.Response, part: PartFile, shown: str) -> int | None:
        """Check the answer's status; make ``part`` match where the body starts; return the total size."""
        status = response.status_code
        if status == 416 and part.size:
            part.restart()  # what we hold is not a prefix of what is there now
            raise ModelFetchError(f"model URL {shown!r} refused to resume; starting over")
        if status in _TRANSIENT_STATUSES:
            raise ModelFetchError(f"model URL {shown!r} answered HTTP {status}")
        if status not in (200, 206):
            raise ModelUnavailable(f"model URL {shown!r} answered HTTP {status}")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or int(match[1]) != part.size:
                part.restart()
                raise ModelFetchError(f"model URL {shown!r} answered a range we did not ask for")
            total = None if match[3] == "*" else int(match[3])
        else:
            part.restart()
            declared = response.headers.get("content-length")
            total = int(declared) if declared and declared.isdigit() else None
        if total is not None and total > self._max_bytes:
            raise ModelUnavailable(f"model URL {shown!r} is larger than {self._max_bytes} bytes")
        return total


class AssetSource:
    """``asset://<sha256>``: a model file uploaded through Comfy API v2 (the runtime hands in the reader)."""

    def __init__(self, reader: AssetReader | None) -> None:
        self._reader = reader

    async def fill(self, spec: ModelSpec, part: PartFile, *, allow_private: bool, progress: Progress) -> None:
        if self._reader is None:
            raise ModelUnavailable(f"model {spec.path}: this server keeps no uploaded model files")
        part.restart()
        async for chunk in self._reader(spec.sha256):
            part.write(chunk)
            progress(part.size, None)


class S3Source:
    """``s3://bucket/key`` through boto3 (the ``s3`` extra), in worker threads, resuming with ``Range``.
    Credentials and endpoint come from boto3's usual environment (``AWS_…``, ``AWS_ENDPOINT_URL``)."""

    def __init__(self, *, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._client: object = None

    def _s3(self) -> object:
        if self._client is None:
            try:
                import boto3
            except ImportError as exc:
                raise ModelUnavailable(
                    f"s3:// model URLs need boto3: pip install 'comfyfleet[s3]' ({exc})"
                ) from exc
            self._client = boto3.client("s3")
        return self._client

    async def fill(self, spec: ModelSpec, part: PartFile, *, allow_private: bool, progress: Progress) -> None:
        parts = urlsplit(spec.url)
        bucket, key = parts.hostname or "", parts.path.lstrip("/")
        client = self._s3()
        extra = {"Range": f"bytes={part.size}-"} if part.size else {}
        try:
            answer = await asyncio.to_thread(client.get_object, Bucket=bucket, Key=key, **extra)  # type: ignore[attr-defined]
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "NoSuchBucket", "AccessDenied", "404", "403"}:
                raise ModelUnavailable(f"model {spec.url!r}: {code}") from exc
            if code == "InvalidRange":
                part.restart()
            raise ModelFetchError(f"model {spec.url!r}: {exc}") from exc
        if not extra:
            part.restart()
        body = answer["Body"]
        total = part.size + int(answer.get("ContentLength") or 0)
        if total > self._max_bytes:
            raise ModelUnavailable(f"model {spec.url!r} is larger than {self._max_bytes} bytes")
        try:
            while chunk := await asyncio.to_thread(body.read, 1024 * 1024):
                part.write(chunk)
                progress(part.size, total)
        except Exception as exc:
            raise ModelFetchError(f"model {spec.url!r}: {exc}") from exc
        finally:
            body.close()
