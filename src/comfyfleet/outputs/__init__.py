"""Artifact storage for output files."""

from __future__ import annotations

import importlib

from comfyfleet.outputs.base import InvalidOutputName, OutputNotFound, OutputsError, OutputStore, StoredOutput

BACKENDS: dict[str, str] = {
    "file": "comfyfleet.outputs.local:LocalOutputStore",
}


def open_outputs(location: str) -> OutputStore:
    """A directory path (or ``file://`` URL) gives local storage."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else "file"
    target = BACKENDS.get(scheme)
    if target is None:
        valid = ", ".join(sorted(BACKENDS))
        raise OutputsError(f"unknown outputs location {location!r}: use a directory or one of {valid}://")
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    root = location.split("://", 1)[1] if "://" in location else location
    store: OutputStore = getattr(module, class_name)(root)
    return store


__all__ = ["InvalidOutputName", "OutputNotFound", "OutputStore", "OutputsError", "StoredOutput", "open_outputs"]
