"""Each worker's models folder, laid out like ComfyUI's ``models/``: ``<worker dir>/models/<folder>/<name>``.

Its files are hard links to the host cache (no copy, and a link keeps its bytes even if the cache evicts
them later), or symbolic links when the worker folder is on another filesystem. ComfyUI reads the folder
through ``--extra-model-paths-config <worker dir>/extra_model_paths.yaml``, which :func:`worker_paths`
writes; the ``process`` provider offers both paths as ``{models_dir}`` and ``{extra_model_paths}``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from comfyfleet.models.spec import DEFAULT_MODEL_FOLDERS


@dataclass(frozen=True, slots=True)
class WorkerPaths:
    root: Path
    models_dir: Path
    extra_model_paths: Path


def worker_paths(workers_dir: Path, worker_id: str) -> WorkerPaths:
    """The folders of one worker, created, with its ``extra_model_paths.yaml`` written."""
    root = workers_dir.absolute() / worker_id
    models_dir = root / "models"
    for folder in DEFAULT_MODEL_FOLDERS:
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    config = root / "extra_model_paths.yaml"
    if not config.exists():
        entry: dict[str, object] = {"base_path": str(models_dir)}
        entry.update({folder: f"{folder}/" for folder in DEFAULT_MODEL_FOLDERS})
        _write_atomically(config, yaml.safe_dump({"comfyfleet": entry}, sort_keys=False).encode())
    return WorkerPaths(root, models_dir, config)


def link_file(cached: Path, models_dir: Path, folder: str, name: str) -> Path:
    """Make ``models_dir/folder/name`` the cached file; returns its path. An existing link to the same file is
    left as it is; anything else there is replaced atomically (the name now means this content)."""
    target = models_dir / folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(target, cached):
            return target
    temporary = target.parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.link(cached, temporary)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        os.symlink(cached.absolute(), temporary)
    os.replace(temporary, target)
    return target


def holds(models_dir: Path, folder: str, name: str, cached: Path) -> bool:
    """Whether the worker folder already has this file under this name."""
    try:
        return os.path.samefile(models_dir / folder / name, cached)
    except OSError:
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
