"""What an asset's ``file_path`` says: an input file (``photo.png``, ``input/x/photo.png``) or a model file of
one of ComfyUI's model folders (``models/loras/x.safetensors``). Paths are checked before anything is stored:
no absolute path, no ``..`` or empty segment, no backslash or control character."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from comfyfleet.assets.errors import InvalidAsset

MAX_PATH_LENGTH = 1024
MODEL_SUFFIX = ".safetensors"
_UNSAFE_CHARACTER = re.compile(r"[^A-Za-z0-9._\- ]")


@dataclass(frozen=True, slots=True)
class Placement:
    """``model_folder`` is set for a model file, ``name`` its name within that folder (sub-folders kept);
    for an input file ``name`` is its file name."""

    name: str
    model_folder: str | None = None


def classify(file_path: str, model_folders: Collection[str]) -> Placement:
    """Where ``file_path`` places the file; :class:`InvalidAsset` for a path that could escape its folder, a
    model folder not allowed, or a model file that is not ``.safetensors``."""
    if not file_path or len(file_path) > MAX_PATH_LENGTH:
        raise InvalidAsset(f"file_path must hold 1 to {MAX_PATH_LENGTH} characters")
    if (
        file_path.startswith("/")
        or "\\" in file_path
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in file_path)
    ):
        raise InvalidAsset("file_path must be a relative path with '/' separators and no control characters")
    segments = file_path.split("/")
    if any(segment in {"", ".", ".."} for segment in segments):
        raise InvalidAsset("file_path may hold no empty, '.' or '..' segment")
    if segments[0] != "models":
        return Placement(name=segments[-1])
    if len(segments) < 3:
        raise InvalidAsset("a model file's path is models/<folder>/<name>.safetensors")
    folder = segments[1]
    if folder not in model_folders:
        allowed = ", ".join(sorted(model_folders))
        raise InvalidAsset(
            f"model folder {folder!r} is not one files may be uploaded to (allowed: {allowed})"
        )
    name = "/".join(segments[2:])
    if not name.endswith(MODEL_SUFFIX):
        raise InvalidAsset(f"model files must be safetensors (named *{MODEL_SUFFIX}); others can run code")
    return Placement(name=name, model_folder=folder)


def input_name(asset_id: str, file_path: str | None) -> str:
    """The plain file name an asset takes among a task's inputs: unique (the asset id leads) and safe for a
    worker's input folder."""
    base = (file_path or "").rsplit("/", 1)[-1]
    safe = _UNSAFE_CHARACTER.sub("_", base).strip(" ")[:120] or "asset"
    return f"{asset_id.replace('-', '')[:12]}-{safe}"
