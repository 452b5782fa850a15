"""The safetensors check of a model upload: its header read as data, never its tensors unpickled.

A safetensors file is an 8-byte little-endian length N, N bytes of a JSON object (each tensor's ``dtype``,
``shape`` and ``data_offsets`` within the data that follows, and an optional ``__metadata__`` of strings),
then the tensor data. Anything else (a pickle ``.ckpt`` renamed, a truncated file) is refused.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from comfyfleet.assets.errors import InvalidAsset

# safetensors' own bound on the header.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(source: BinaryIO, size: int) -> dict[str, Any]:
    """The header of the safetensors file ``source`` (``size`` bytes, read from its start; left at its
    start), checked against the file's size; :class:`InvalidAsset` when it is not one."""
    source.seek(0)
    try:
        prefix = source.read(8)
        if len(prefix) < 8:
            raise InvalidAsset("not a safetensors file: shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise InvalidAsset("not a safetensors file: its header length does not fit the file")
        raw = source.read(length)
    finally:
        source.seek(0)
    return check_header(raw, data_size=size - 8 - length)


def check_header(raw: bytes, *, data_size: int) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidAsset("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidAsset("not a safetensors file: its header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise InvalidAsset("not a safetensors file: __metadata__ must map names to strings")
            continue
        _check_tensor(name, entry, data_size)
    return header


def _check_tensor(name: str, entry: Any, data_size: int) -> None:
    problem = f"not a safetensors file: tensor {name[:100]!r} "
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise InvalidAsset(problem + "has no dtype")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidAsset(problem + "has no valid shape")
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise InvalidAsset(problem + "has data offsets outside the file")
