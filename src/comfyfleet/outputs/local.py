"""Output files in a local directory: ``<root>/<task id>/<name>``."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from comfyfleet.outputs.base import RESERVED_SUFFIX, OutputNotFound, StoredOutput, check_name

_CHUNK = 256 * 1024
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


def _content_type_sidecar(path: Path) -> Path:
    # check_name keeps this suffix out of every output's name, so a sidecar never meets a file.
    return path.with_name(path.name + RESERVED_SUFFIX)


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
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(f".{name}.partial")
        size = 0
        handle = await asyncio.to_thread(partial.open, "wb")
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                handle.close()
        except BaseException:
            # A failed or cancelled upload leaves the previous file (if any) as it was, and no litter.
            partial.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(_content_type_sidecar(path).write_text, content_type)
        # Rename last, so a reader never sees a half-written file under the final name.
        await asyncio.to_thread(os.replace, partial, path)
        return StoredOutput(name=name, size=size, content_type=content_type)

    async def stat(self, task_id: str, name: str) -> StoredOutput:
        path = self._path(task_id, name)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError as exc:
            raise OutputNotFound(f"no output {name!r} for task {task_id}") from exc
        try:
            content_type = await asyncio.to_thread(_content_type_sidecar(path).read_text)
        except FileNotFoundError:
            content_type = _DEFAULT_CONTENT_TYPE
        return StoredOutput(name=name, size=size, content_type=content_type)

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
