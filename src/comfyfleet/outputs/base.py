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


@dataclass(frozen=True, slots=True)
class StoredOutput:
    name: str
    size: int
    content_type: str


class OutputStore(Protocol):
    async def put(self, task_id: str, name: str, chunks: AsyncIterator[bytes], content_type: str) -> StoredOutput:
        """Store one file of a task from a stream of chunks; replaces a file of the same name."""

    async def stat(self, task_id: str, name: str) -> StoredOutput:
        """Raise :class:`OutputNotFound` when missing."""

    def read(self, task_id: str, name: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; raises :class:`OutputNotFound` when missing."""

    async def delete_task(self, task_id: str) -> None:
        """Remove every file of a task (a no-op when none)."""
