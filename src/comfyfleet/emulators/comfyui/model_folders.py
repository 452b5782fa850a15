"""Model files on disk, found the way ComfyUI's ``folder_paths`` finds them.

ComfyUI maps each model folder name (``checkpoints``, ``loras``…) to one or more directories under
``models/`` plus those of ``--extra-model-paths-config`` files, lists every file below them (recursively,
following links) whose extension it supports, and caches each list until the modification time of one of
the directories it walked changes. This does the same, so a file that comfyfleet links or renames into a
worker's models folder becomes loadable on the next ``/object_info`` or ``/prompt`` without a restart.
"""

from __future__ import annotations

import os
import time
from typing import Any

import yaml

from comfyfleet.emulators.comfyui.options import OptionsError

# Upstream's ``supported_pt_extensions``, plus ``.gguf`` that the ComfyUI-GGUF custom node adds.
SUPPORTED_EXTENSIONS = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft", ".gguf"}
)

# Folder name -> the directories of ``models/`` that upstream reads for it (as in ``folder_paths.py``).
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
}
# Names that upstream's ``map_legacy`` turns into the current ones (used in extra model paths files).
LEGACY_NAMES = {"clip": "text_encoders", "unet": "diffusion_models"}
_SETTLED_NS = 50_000_000


def read_extra_model_paths(path: str) -> list[tuple[str, str, bool]]:
    """``(folder name, directory, is_default)`` entries of an ``extra_model_paths.yaml``, resolved like
    upstream's ``load_extra_path_config``: a section's ``base_path`` (relative to the file) prefixes its
    paths, a value may hold several paths one per line, ``is_default`` puts them first."""
    try:
        with open(path, encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError) as exc:
        raise OptionsError(f"cannot read the extra model paths config {path}: {exc}") from None
    if config is None:
        return []
    if not isinstance(config, dict) or not all(isinstance(c, dict) or c is None for c in config.values()):
        raise OptionsError(f"{path}: each section of an extra model paths config must be a mapping")
    yaml_dir = os.path.dirname(os.path.abspath(path))
    entries: list[tuple[str, str, bool]] = []
    for section in config.values():
        entries.extend(_section_entries(dict(section or {}), yaml_dir, path))
    return entries


def _section_entries(section: dict[str, Any], yaml_dir: str, path: str) -> list[tuple[str, str, bool]]:
    base_path = section.pop("base_path", None)
    if base_path is not None:
        base_path = os.path.expandvars(os.path.expanduser(str(base_path)))
        if not os.path.isabs(base_path):
            base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
    is_default = bool(section.pop("is_default", False))
    entries = []
    for folder, value in section.items():
        if not isinstance(value, str):
            raise OptionsError(f"{path}: {folder} must be a path or several paths one per line")
        for line in value.split("\n"):
            if not line:
                continue
            full = os.path.join(base_path, line) if base_path else os.path.join(yaml_dir, line)
            entries.append((LEGACY_NAMES.get(str(folder), str(folder)), os.path.normpath(full), is_default))
    return entries


class ModelFolders:
    """The directories of each model folder and their file lists, re-read when a directory changes."""

    def __init__(self, models_dir: str | None, extra_model_paths_config: str | None) -> None:
        self.paths: dict[str, list[str]] = {}
        if models_dir:
            base = os.path.abspath(models_dir)
            for folder, subdirs in FOLDERS.items():
                self.paths[folder] = [os.path.join(base, subdir) for subdir in subdirs]
        if extra_model_paths_config:
            for folder, directory, is_default in read_extra_model_paths(extra_model_paths_config):
                directories = self.paths.setdefault(folder, [])
                if directory in directories:
                    directories.remove(directory)
                directories.insert(0, directory) if is_default else directories.append(directory)
        # folder -> (sorted names, {directory walked: its st_mtime_ns}, when it was scanned)
        self._cache: dict[str, tuple[list[str], dict[str, int], int]] = {}

    @property
    def enabled(self) -> bool:
        """True when model lists come from disk (``--models-dir`` or an extra model paths config)."""
        return bool(self.paths)

    def folder_names(self) -> list[str]:
        return sorted(self.paths)

    def files(self, folder: str) -> list[str]:
        """The model files of ``folder`` as ComfyUI names them: paths relative to their directory."""
        cached = self._cache.get(folder)
        if cached is not None and self._still_valid(folder, cached[1], cached[2]):
            return cached[0]
        scanned_ns = time.time_ns()
        names: set[str] = set()
        walked: dict[str, int] = {}
        for directory in self.paths.get(folder, []):
            names.update(_walk(directory, walked))
        listing = sorted(names)
        self._cache[folder] = (listing, walked, scanned_ns)
        return listing

    def full_path(self, folder: str, name: str) -> str | None:
        """Where a listed file is, or None (upstream's ``get_full_path``)."""
        if name not in self.files(folder):
            return None
        for directory in self.paths.get(folder, []):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return candidate
        return None

    def _still_valid(self, folder: str, walked: dict[str, int], scanned_ns: int) -> bool:
        for directory, mtime in walked.items():
            try:
                # A directory changed just before the scan may change again within the file system's
                # timestamp granularity (a few ms) without a new mtime: trust only settled directories.
                if os.stat(directory).st_mtime_ns != mtime or scanned_ns - mtime < _SETTLED_NS:
                    return False
            except OSError:
                return False
        # A configured directory that did not exist at the last scan may have been created since.
        return all(d in walked or not os.path.isdir(d) for d in self.paths.get(folder, []))


def _walk(directory: str, walked: dict[str, int], prefix: str = "") -> list[str]:
    """Names below ``directory`` with a supported extension; records each directory's mtime *before* reading
    it, so a file added during the walk makes the next look-up read it again."""
    try:
        walked[directory] = os.stat(directory).st_mtime_ns
        entries = list(os.scandir(directory))
    except OSError:
        return []
    names = []
    for entry in entries:
        if entry.is_dir() and entry.name != ".git":  # follows links, like upstream's walk
            names.extend(_walk(entry.path, walked, f"{prefix}{entry.name}/"))
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in SUPPORTED_EXTENSIONS:
            names.append(prefix + entry.name)
    return names
