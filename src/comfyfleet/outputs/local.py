"""Output files in a local directory: ``<root>/<task id>/<name>``."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from comfyfleet.outputs.base import (
    RESERVED_SUFFIX,
    SMALL_OUTPUT_BYTES,
    OpenedOutput,
    OutputNotFound,
    StoredOutput,
    check_name,
)

_CHUNK = 256 * 1024
_WRITE_BATCH = 1024 * 1024
_DEFAULT_CONTENT_TYPE = "application/octet-stream"
# A file of one of these kinds whose content type is the usual one gets no sidecar: creating a file is the
# dearest step of storing a small output (a new inode), and most outputs are PNGs. A fixed table, not the
# system's mimetypes database, so a file means the same on every machine that reads it.
_USUAL_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".json": "application/json",
}


def _usual_content_type(path: Path) -> str | None:
    return _USUAL_CONTENT_TYPES.get(path.suffix.lower())


def _content_type_sidecar(path: Path) -> Path:
    # check_name keeps this suffix out of every output's name, so a sidecar never meets a file.
    return path.with_name(path.name + RESERVED_SUFFIX)


class _PartialFile:
    """A file being written under its ``.partial`` name, renamed to its own once complete (so a reader never
    sees half of it), with its content type beside it unless it is the usual one for the file's suffix."""

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self._handle: BinaryIO | None = None

    @property
    def started(self) -> bool:
        return self._handle is not None

    def write(self, chunks: list[bytes]) -> None:
        if self._handle is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.partial.open("wb")
        self._handle.writelines(chunks)

    def finish(self, chunks: list[bytes], path: Path, content_type: str) -> None:
        self.write(chunks)
        assert self._handle is not None
        self._handle.close()
        sidecar = _content_type_sidecar(path)
        if content_type == _usual_content_type(path):
            sidecar.unlink(missing_ok=True)  # from an earlier file of this name, of another type
        else:
            sidecar.write_text(content_type)
        # Rename last, so a reader never sees a half-written file under the final name.
        os.replace(self.partial, path)

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.partial.unlink(missing_ok=True)


def _content_type_of(path: Path) -> str:
    try:
        return _content_type_sidecar(path).read_text()
    except FileNotFoundError:
        return _usual_content_type(path) or _DEFAULT_CONTENT_TYPE


def _open(path: Path, name: str) -> OpenedOutput | None:
    try:
        size = path.stat().st_size
        content = path.read_bytes() if size <= SMALL_OUTPUT_BYTES else None
    except FileNotFoundError:
        return None
    content_type = _content_type_of(path)
    if content is not None:
        size = len(content)  # replaced since the stat: these are the bytes answered
    return OpenedOutput(StoredOutput(name=name, size=size, content_type=content_type), content)


class LocalOutputStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, task_id: str, name: str) -> Path:
        check_name(task_id)
        check_name(name)
        return self.root / task_id / name

    async def put(
        self, task_id: str, name: str, chunks: AsyncIterator[bytes], content_type: str
    ) -> StoredOutput:
        path = self._path(task_id, name)
        content_type = content_type or _DEFAULT_CONTENT_TYPE
        partial = path.with_name(f".{name}.partial")
        # The bytes go to the disk a megabyte at a time, each batch in one trip to a thread; a small file
        # (most outputs) is written at the end, on the loop.
        writer = _PartialFile(partial)
        size, batch, batched = 0, [], 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await asyncio.to_thread(writer.write, batch)
                    batch, batched = [], 0
            if writer.started or batched > SMALL_OUTPUT_BYTES:
                await asyncio.to_thread(writer.finish, batch, path, content_type)
            else:  # a small file, whole in memory: a few system calls cost less than a trip to a thread
                writer.finish(batch, path, content_type)
        except BaseException:
            # A failed or cancelled upload leaves the previous file (if any) as it was, and no litter.
            writer.discard()
            raise
        return StoredOutput(name=name, size=size, content_type=content_type)

    async def stat(self, task_id: str, name: str) -> StoredOutput:
        path = self._path(task_id, name)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError as exc:
            raise OutputNotFound(f"no output {name!r} for task {task_id}") from exc
        content_type = await asyncio.to_thread(_content_type_of, path)
        return StoredOutput(name=name, size=size, content_type=content_type)

    async def open(self, task_id: str, name: str) -> OpenedOutput:
        path = self._path(task_id, name)
        # On the loop: a stat and (for a small file) two short reads cost less than a trip to a thread.
        opened = _open(path, name)
        if opened is None:
            raise OutputNotFound(f"no output {name!r} for task {task_id}")
        return opened

    async def read(self, task_id: str, name: str) -> AsyncIterator[bytes]:
        path = self._path(task_id, name)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as exc:
            raise OutputNotFound(f"no output {name!r} for task {task_id}") from exc
        try:
            while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                yield chunk
        finally:
            # Closed synchronously: under a cancelled (anyio) scope an awaited close would never run.
            handle.close()

    async def delete_task(self, task_id: str) -> None:
        self._path(task_id, "x")
        await asyncio.to_thread(shutil.rmtree, self.root / task_id, True)
