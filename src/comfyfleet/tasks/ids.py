"""Ids of new tasks: random (version 4) UUIDs."""

from __future__ import annotations

import os
import uuid


class TaskIds:
    """Random (version 4) UUIDs from OS randomness fetched for 256 ids at a time.

    ``uuid.uuid4()`` asks the OS for 16 bytes per id; each such call lets go of the GIL, and taking it
    back from the store's writer thread cost more than the rest of the submission on a busy server.
    """

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def __call__(self) -> str:
        if self._next >= len(self._pool):
            self._pool = os.urandom(16 * self._BATCH)
            self._next = 0
        raw = self._pool[self._next : self._next + 16]
        self._next += 16
        return str(uuid.UUID(bytes=raw, version=4))
