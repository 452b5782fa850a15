"""Artifact storage for the output files comfyfleet collects from workers.

One protocol, one module per backend (``local.py`` by default; ``s3.py`` with the ``s3`` extra), picked
by ``comfyfleet.outputs.open_outputs`` from the ``outputs`` setting (a directory or an ``s3://`` URL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class OutputsError(Exception):
    """Root of every output-storage error."""


class OutputNotFound(OutputsError):
    """No such stored output."""


class InvalidOutputName(OutputsError):
    """A name that could escape the task's folder or is otherwise unusable."""


class OutputsUnavailable(OutputsError):
    """The storage could not be reached or refused the request (credentials, permissions, a missing bucket)."""


# Most file systems cap a name at 255 bytes, and the local store adds up to 13 to name its sidecar files;
# every backend accepts the same names, so none stores a file another could not.
MAX_NAME_BYTES = 240
# The local store keeps each file's content type beside it, in "<name>.content-type": no output may take
# such a name (in any backend, so names mean the same everywhere).
RESERVED_SUFFIX = ".content-type"
_CONTROL_CHARACTERS = frozenset(map(chr, [*range(0x20), 0x7F]))


def check_name(part: str) -> str:
    """``part`` (a task id or a file name) if it is one plain path segment, else :class:`InvalidOutputName`.

    No separators, ``.``/``..`` or NUL, so a name never reaches another task's files; no control characters
    (S3 listings are XML, which cannot carry most of them); valid UTF-8 of at most ``MAX_NAME_BYTES``; not
    ending in ``RESERVED_SUFFIX``."""
    try:
        encoded = part.encode("utf-8")
    except UnicodeEncodeError:
        encoded = b""
    if (
        not encoded
        or len(encoded) > MAX_NAME_BYTES
        or part in {".", ".."}
        or "/" in part
        or "\\" in part
        or not _CONTROL_CHARACTERS.isdisjoint(part)
        or part.endswith(RESERVED_SUFFIX)
    ):
        raise InvalidOutputName(f"invalid output name {part[:300]!r}")
    return part


@dataclass(frozen=True, slots=True)
class StoredOutput:
    name: str
    size: int
    content_type: str


# A file this small is read whole when opened: answered in one piece, without a stream's machinery.
SMALL_OUTPUT_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class OpenedOutput:
    """An output found: what it is, and its bytes when it is at most ``SMALL_OUTPUT_BYTES`` (else None: read
    it in chunks)."""

    stored: StoredOutput
    content: bytes | None


class OutputStore(Protocol):
    async def put(
        self, task_id: str, name: str, chunks: AsyncIterator[bytes], content_type: str
    ) -> StoredOutput:
        """Store one file of a task from a stream of chunks; replaces a file of the same name."""

    async def stat(self, task_id: str, name: str) -> StoredOutput:
        """Raise :class:`OutputNotFound` when missing."""

    async def open(self, task_id: str, name: str) -> OpenedOutput:
        """``stat``, with the whole file when it is small; raises :class:`OutputNotFound` when missing."""

    def read(self, task_id: str, name: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; raises :class:`OutputNotFound` when missing."""

    async def delete_task(self, task_id: str) -> None:
        """Remove every file of a task (a no-op when none)."""
