"""The hashes an asset is known by: blake3 (Comfy API v2's ``blake3:<hex>``) and sha256 (model files)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO

from blake3 import blake3

CHUNK = 1024 * 1024
PREFIX = "blake3:"


@dataclass(frozen=True, slots=True)
class Digest:
    blake3: str  # "blake3:<64 hex>"
    sha256: str  # 64 hex
    size: int


def hash_file(source: BinaryIO) -> Digest:
    """Both hashes of a seekable file, read from its start in chunks; the file is left at its start."""
    source.seek(0)
    fast, slow, size = blake3(), hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        fast.update(chunk)
        slow.update(chunk)
        size += len(chunk)
    source.seek(0)
    return Digest(PREFIX + fast.hexdigest(), slow.hexdigest(), size)


def normal_hash(text: str) -> str | None:
    """``text`` as ``blake3:<64 lowercase hex>``, or None when it is not a blake3 hash."""
    value = text.strip().lower()
    if not value.startswith(PREFIX):
        return None
    digits = value.removeprefix(PREFIX)
    if len(digits) != 64 or any(ch not in "0123456789abcdef" for ch in digits):
        return None
    return value
