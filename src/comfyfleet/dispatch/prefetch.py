"""Output files fetched while the prompt is still finishing.

A node's ``executed`` frame names its files as soon as the node has written them, before the prompt ends and
before its history entry can be read. Small files are fetched at once, so collecting them costs no ``/view``
round trip after the end. The prompt's outcome stays the authority: a fetched file is used only for an
output item that names the same file, and whatever is not small, failed or was never announced is fetched when
collecting, as before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.errors import ComfyError
from comfyfleet.outputs import SMALL_OUTPUT_BYTES

# A prompt that announces more files than this has them fetched when collecting.
MAX_FILES = 16
FileKey = tuple[str, str, str]  # filename, subfolder, type


@dataclass(frozen=True, slots=True)
class Fetched:
    content_type: str
    content: bytes


def file_key(item: object) -> FileKey | None:
    """The ``/view`` address of an output item, or None when it names no file."""
    if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
        return None
    return item["filename"], str(item.get("subfolder") or ""), str(item.get("type") or "output")


class Prefetch:
    """The files one attempt's ``executed`` frames announced, fetching or fetched."""

    def __init__(self, client: ComfyClient) -> None:
        self._client = client
        self._fetching: dict[FileKey, asyncio.Task[Fetched | None]] = {}

    def announced(self, output: object) -> None:
        """An ``executed`` frame's ``output``: start fetching each file it names."""
        if not isinstance(output, dict):
            return
        for items in output.values():
            for item in items if isinstance(items, list) else ():
                key = file_key(item)
                if key is not None and key not in self._fetching and len(self._fetching) < MAX_FILES:
                    self._fetching[key] = asyncio.ensure_future(self._fetch(key))

    async def _fetch(self, key: FileKey) -> Fetched | None:
        chunks: list[bytes] = []
        size = 0
        try:
            async with self._client.download(*key) as file:
                async for chunk in file.chunks:
                    size += len(chunk)
                    if size > SMALL_OUTPUT_BYTES:
                        return None  # a large file streams straight into the outputs store when collecting
                    chunks.append(chunk)
                return Fetched(file.content_type, b"".join(chunks))
        except ComfyError:
            return None

    async def take(self, item: dict[str, Any]) -> Fetched | None:
        """The file of an outcome's output item, if it was fetched (once: a second take fetches again)."""
        key = file_key(item)
        fetching = self._fetching.pop(key, None) if key is not None else None
        return await fetching if fetching is not None else None

    def cancel(self) -> None:
        for fetching in self._fetching.values():
            fetching.cancel()
        self._fetching.clear()
