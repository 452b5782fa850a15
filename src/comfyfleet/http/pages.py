"""Answers that list many tasks, kept to a byte budget (``limits.max_page_bytes``) by every front door.

A list is built from JSON pieces, one per task, each encoded as soon as its task is read; the budget says
whether the next piece still fits. The first piece always does (a page holds at least one task), so a task
larger than the budget comes alone. What the server holds for one answer is then the budget, plus the one
task being encoded, plus the page of tasks read without their payloads.
"""

from __future__ import annotations

from collections.abc import Sequence

from comfyfleet.http.responses import json_bytes


class ByteBudget:
    """How much JSON one answer may still take."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.taken = 0

    def take(self, piece: bytes) -> bool:
        """Count ``piece`` in, or say False when it would take the answer past the limit (never for the first)."""
        if self.taken and self.used + len(piece) > self.limit:
            return False
        self.used += len(piece)
        self.taken += 1
        return True


def json_array(pieces: Sequence[bytes]) -> list[bytes]:
    """The parts of a JSON array of already encoded values, to be joined once with the rest of the answer
    (each join copies: an answer near its budget is copied once, not once per level)."""
    parts = [b"["]
    for index, piece in enumerate(pieces):
        parts += (b",", piece) if index else (piece,)
    parts.append(b"]")
    return parts


def json_object(entries: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """The parts of a JSON object of keys and already encoded values, in their order (see :func:`json_array`)."""
    parts = [b"{"]
    for index, (key, value) in enumerate(entries):
        parts += (b"," if index else b"", json_bytes(key), b":", value)
    parts.append(b"}")
    return parts
