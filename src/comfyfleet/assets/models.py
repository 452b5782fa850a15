"""The fleet's model files: uploaded through Comfy API v2 (``models/<folder>/<name>.safetensors``), kept in the
output store, recorded by ComfyUI folder and name and content-addressed by sha256 (and blake3).

:class:`ModelLibrary` is the lookup other parts use (models on demand places these files on workers):
``find_model(sha256)``, ``list_models(folder)``, ``read(model)``. :func:`place_model_file` writes one into a
ComfyUI models directory on this host safely: allow-listed folders only, no path (or symlink) leading out of
the folder, and atomically without overwriting a file already there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime
from pathlib import Path

from comfyfleet.assets.errors import AssetNotFound, AssetsUnavailable, InvalidAsset, ModelNameTaken
from comfyfleet.assets.paths import MODEL_SUFFIX
from comfyfleet.domain import Blob, ModelFile
from comfyfleet.models import ModelUnavailable
from comfyfleet.outputs import OutputNotFound, OutputStore
from comfyfleet.store import Store


class ModelLibrary:
    def __init__(self, store: Store, outputs: OutputStore | None) -> None:
        self._store = store
        self._outputs = outputs

    async def find_model(self, sha256: str) -> ModelFile | None:
        """The model file with this content (sha256, hex), or None."""
        return await self._store.find_model_file(sha256.lower())

    async def list_models(self, folder: str | None = None) -> list[ModelFile]:
        """The model files of one ComfyUI folder (``loras``…), or all of them, by folder and name."""
        return await self._store.list_model_files(folder)

    async def read(self, model: ModelFile) -> AsyncIterator[bytes]:
        """The bytes of a model file, in chunks."""
        if self._outputs is None:
            raise AssetsUnavailable("this server has no output store")
        try:
            async for chunk in self._outputs.read(model.file.folder, model.file.key):
                yield chunk
        except OutputNotFound as exc:
            raise AssetNotFound(
                f"the bytes of model {model.folder}/{model.name} are no longer stored"
            ) from exc

    async def read_sha256(self, sha256: str) -> AsyncIterator[bytes]:
        """The bytes of the model file with this sha256, for models on demand (``asset://<sha256>``): raises
        :class:`~comfyfleet.models.ModelUnavailable` when there is none or its bytes are gone."""
        model = await self.find_model(sha256)
        if model is None:
            raise ModelUnavailable(f"no uploaded model file has sha256 {sha256}")
        try:
            async for chunk in self.read(model):
                yield chunk
        except (AssetNotFound, AssetsUnavailable) as exc:
            raise ModelUnavailable(str(exc)) from exc

    async def record(self, tenant: str, blob: Blob, folder: str, name: str) -> ModelFile:
        """Record ``blob`` as the model ``folder``/``name`` (the record holds a reference of its own to the
        blob, so deleting the asset keeps the model). The same content under the same name is the record
        already there; other content under a taken name is :class:`ModelNameTaken`."""
        held = await self._store.take_blob(blob.tenant, blob.hash)
        if held is None:
            raise AssetNotFound("the model's bytes were removed meanwhile; upload them again")
        model = ModelFile(
            sha256=blob.sha256,
            blake3=blob.hash,
            folder=folder,
            name=name,
            size=blob.size,
            file=blob.file,
            tenant=tenant,
            created_at=datetime.now(UTC),  # the store's time is kept
        )
        kept, created = await self._store.put_model_file(model)
        if created:
            return kept
        await self._store.drop_blob(blob.tenant, blob.hash)  # the record there holds its own
        if kept.sha256 != blob.sha256:
            raise ModelNameTaken(
                f"model file {folder}/{name} exists with other content; model files are never overwritten: "
                "upload it under another name"
            )
        return kept


def place_model_file(
    models_root: Path, folder: str, name: str, data: bytes, *, allowed_folders: Collection[str]
) -> Path:
    """Write ``data`` as ``models_root/folder/name`` and return that path.

    ``folder`` must be allow-listed and the file a ``.safetensors``; ``name`` may hold sub-folders but no
    ``..``, absolute part or backslash, and the resolved destination (symlinks followed) must stay inside
    ``models_root/folder``. The bytes go to a temporary file next to the destination, which is then linked
    into place: another process never sees a partial file, and an existing file is never replaced
    (:class:`ModelNameTaken` when the name is taken, unless it holds these very bytes)."""
    if folder not in allowed_folders:
        raise InvalidAsset(f"model folder {folder!r} is not allowed")
    parts = name.split("/")
    if not name.endswith(MODEL_SUFFIX) or "\\" in name or any(part in {"", ".", ".."} for part in parts):
        raise InvalidAsset(f"invalid model file name {name!r}")
    base = (models_root / folder).resolve()
    destination = base.joinpath(*parts)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Resolved after the folders exist: a symlinked folder on the way is followed, and must stay inside.
    if not destination.parent.resolve().is_relative_to(base) or destination.is_symlink():
        raise InvalidAsset(f"model file {name!r} would be written outside {folder}/")
    partial = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.partial"
    with open(partial, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(partial, destination)  # fails if the destination exists: never overwrites
    except FileExistsError:
        if destination.is_file() and not destination.is_symlink() and destination.read_bytes() == data:
            return destination
        raise ModelNameTaken(f"{folder}/{name} exists with other content") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return destination
