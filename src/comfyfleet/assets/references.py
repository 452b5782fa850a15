"""``core/ASSET`` references in a workflow graph: found anywhere in it, and replaced by file names.

A reference is ``{"__type": "core/ASSET", "info": {"id": "<asset id>", "hash": …, "file_path": …}}`` where a
node would take a file name; ``info.id`` is authoritative, the other fields are hints and never used here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

ASSET_TYPE = "core/ASSET"


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__type") == ASSET_TYPE


def reference_id(value: dict[str, Any]) -> str | None:
    """The asset id a reference names, or None when it is malformed."""
    info = value.get("info")
    asset_id = info.get("id") if isinstance(info, dict) else None
    return asset_id if isinstance(asset_id, str) and 0 < len(asset_id) <= 200 else None


def find_references(value: Any) -> Iterator[dict[str, Any]]:
    """Every reference in ``value`` (nested objects and lists included), in document order."""
    if is_reference(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from find_references(item)
    elif isinstance(value, list):
        for item in value:
            yield from find_references(item)


def replace_references(value: Any, name_of: Callable[[dict[str, Any]], str]) -> Any:
    """A copy of ``value`` with each reference replaced by ``name_of(reference)``."""
    if is_reference(value):
        return name_of(value)
    if isinstance(value, dict):
        return {key: replace_references(item, name_of) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_references(item, name_of) for item in value]
    return value
