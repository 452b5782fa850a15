"""Files uploaded through the gateway's ``POST /upload/image``, kept until a prompt uses them.

ComfyUI keeps an upload in its input folder, where a later prompt's ``LoadImage`` finds it by name. The
fleet has no single input folder: the gateway keeps the file in the output storage (under a folder per
tenant), and when a prompt references it, attaches it to the task as an input; the dispatcher then
uploads it to whichever worker runs the task.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from urllib.parse import quote

from comfyfleet.outputs import InvalidOutputName, OutputNotFound, OutputStore, check_name

MAX_NAME_LENGTH = 180  # the stored name is percent-encoded and must stay under file-system limits
_ANNOTATION = re.compile(r"\s*\[(input|output|temp)\]$")


class UploadError(ValueError):
    """An upload the gateway refuses (bad name or subfolder); ComfyUI answers these with 400."""


def strip_annotation(reference: str) -> tuple[str, str | None]:
    """``"name.png [input]"`` → ``("name.png", "input")``: ComfyUI clients may annotate a file's folder."""
    match = _ANNOTATION.search(reference)
    if match is None:
        return reference, None
    return reference[: match.start()], match.group(1)


def split_reference(reference: str) -> tuple[str, str]:
    """``"sub/dir/name.png"`` → ``("sub/dir", "name.png")``, refusing anything that climbs out."""
    parts = [part for part in reference.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts) or reference.startswith("/"):
        raise UploadError(f"invalid file reference {reference[:100]!r}")
    return "/".join(parts[:-1]), parts[-1]


def _clean_filename(filename: str) -> str:
    name = PurePosixPath(filename.replace("\\", "/")).name.strip()
    if not name or name in {".", ".."} or "\x00" in name:
        raise UploadError("the upload needs a file name")
    return name


def _clean_subfolder(subfolder: str) -> str:
    if not subfolder:
        return ""
    if subfolder.startswith("/") or "\x00" in subfolder:
        raise UploadError(f"invalid subfolder {subfolder[:100]!r}")
    parts = [part for part in subfolder.replace("\\", "/").split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise UploadError(f"invalid subfolder {subfolder[:100]!r}")
    return "/".join(parts)


def _numbered(name: str, counter: int) -> str:
    stem, dot, suffix = name.rpartition(".")
    return f"{stem} ({counter}).{suffix}" if dot and stem else f"{name} ({counter})"


class UploadStore:
    def __init__(self, outputs: OutputStore) -> None:
        self._outputs = outputs
        self._lock = asyncio.Lock()

    @staticmethod
    def _folder(tenant: str) -> str:
        return "_uploads-" + hashlib.sha256(tenant.encode()).hexdigest()[:16]

    @staticmethod
    def _key(subfolder: str, name: str) -> str:
        """The stored name of ``subfolder/name`` (percent-encoded); :class:`UploadError` for a name the
        output storage cannot keep."""
        try:
            key = quote(f"{subfolder}/{name}", safe="")
        except UnicodeEncodeError:  # a lone surrogate: not text, not a file name
            raise UploadError(f"invalid file name {name[:100]!r}") from None
        if len(key) > MAX_NAME_LENGTH:
            raise UploadError(f"file name {name[:60]!r}… is too long")
        try:
            return check_name(key)
        except InvalidOutputName:
            raise UploadError(f"invalid file name {name[:100]!r}") from None

    async def _digest(self, tenant: str, key: str) -> str | None:
        hasher = hashlib.sha256()
        try:
            async for chunk in self._outputs.read(self._folder(tenant), key):
                hasher.update(chunk)
        except OutputNotFound:
            return None
        return hasher.hexdigest()

    async def save(
        self, tenant: str, filename: str, subfolder: str, data: bytes, *, content_type: str, overwrite: bool
    ) -> tuple[str, str]:
        """Keep an upload; return the ``(name, subfolder)`` a prompt references it by. As ComfyUI: the same
        name with identical bytes reuses the file, different bytes get ``"name (1).png"`` unless
        ``overwrite``."""
        name = _clean_filename(filename)
        folder = _clean_subfolder(subfolder)
        digest = hashlib.sha256(data).hexdigest()
        async with self._lock:
            candidate, counter = name, 0
            while not overwrite:
                existing = await self._digest(tenant, self._key(folder, candidate))
                if existing is None or existing == digest:
                    break
                counter += 1
                candidate = _numbered(name, counter)

            async def chunks() -> AsyncIterator[bytes]:
                yield data

            try:
                await self._outputs.put(
                    self._folder(tenant), self._key(folder, candidate), chunks(), content_type
                )
            except InvalidOutputName as exc:
                raise UploadError(str(exc)) from exc
        return candidate, folder

    async def load(self, tenant: str, reference: str) -> bytes | None:
        """The bytes of an upload referenced as ``"name"`` or ``"sub/name"``; None when there is none."""
        try:
            folder, name = split_reference(strip_annotation(reference)[0])
            key = self._key(folder, name)
        except UploadError:
            return None
        parts = []
        try:
            async for chunk in self._outputs.read(self._folder(tenant), key):
                parts.append(chunk)
        except (OutputNotFound, InvalidOutputName):
            return None
        return b"".join(parts)

    async def open(
        self, tenant: str, subfolder: str, filename: str
    ) -> tuple[AsyncIterator[bytes], str, int] | None:
        """For ``/view?type=input``: a stream of the file, its content type and size; None when missing."""
        try:
            key = self._key(_clean_subfolder(subfolder), _clean_filename(filename))
            stored = await self._outputs.stat(self._folder(tenant), key)
        except (UploadError, OutputNotFound, InvalidOutputName):
            return None
        return self._outputs.read(self._folder(tenant), key), stored.content_type, stored.size
