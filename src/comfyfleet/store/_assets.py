"""The asset records (Comfy API v2's assets, their blobs, the fleet's model files), written once over a
dialect's seam (see ``sql.py``).

A blob's ``refs`` counts the asset records and model files over it. Each change of it is one statement on
one row, so two replicas taking and dropping references at once cannot lose a count; a blob whose count
reached zero is deleted by the one that brought it there, and nobody takes a reference to it meanwhile
(``refs > 0`` is part of every taking statement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from comfyfleet.domain import Asset, Blob, ModelFile, StoredFile
from comfyfleet.store._records import RecordsMixin
from comfyfleet.store._rows import Row
from comfyfleet.store.base import NotFound, StoreError


class AssetsMixin(RecordsMixin):
    def _blob(self, row: Row) -> Blob:
        tenant, hash_, sha256, size, folder, key = row
        return Blob(str(tenant), str(hash_), str(sha256), int(size), StoredFile(str(folder), str(key)))

    def _asset(self, row: Row) -> Asset:
        asset_id, tenant, hash_, size, content_type, file_path, folder, key, job_id, tags, created_at = row
        loaded = self.codec.load_json(tags)
        return Asset(
            id=str(asset_id),
            tenant=str(tenant),
            hash=hash_,
            size=int(size),
            content_type=str(content_type),
            file_path=file_path,
            file=StoredFile(str(folder), str(key)),
            created_at=self.codec.load_time(created_at),
            job_id=job_id,
            tags=tuple(str(tag) for tag in loaded) if isinstance(loaded, list) else (),
        )

    def _model_file(self, row: Row) -> ModelFile:
        sha256, blake3, folder, name, size, file_folder, file_key, tenant, created_at = row
        return ModelFile(
            sha256=str(sha256),
            blake3=str(blake3),
            folder=str(folder),
            name=str(name),
            size=int(size),
            file=StoredFile(str(file_folder), str(file_key)),
            tenant=str(tenant),
            created_at=self.codec.load_time(created_at),
        )

    # -- blobs ----------------------------------------------------------------------------------------
    async def take_blob(self, tenant: str, hash: str) -> Blob | None:
        rows = await self._write(self.sql.take_blob, {"tenant": tenant, "hash": hash})
        return self._blob(rows[0]) if rows else None

    async def put_blob(self, blob: Blob) -> tuple[Blob, bool]:
        params = {
            "tenant": blob.tenant,
            "hash": blob.hash,
            "sha256": blob.sha256,
            "size": blob.size,
            "folder": blob.file.folder,
            "key": blob.file.key,
            **self._now(),
        }
        # Three times at most: a blob of this hash whose last reference is being dropped right now is gone
        # the moment after, and then this one can be inserted.
        for _ in range(3):
            rows = await self._write(self.sql.put_blob, params)
            if rows:
                kept = self._blob(rows[0])
                return kept, kept.file == blob.file
        raise StoreError(f"could not store blob {blob.hash} of tenant {blob.tenant}: keeps being removed")

    async def drop_blob(self, tenant: str, hash: str) -> Blob | None:
        params = {"tenant": tenant, "hash": hash}
        rows = await self._write(self.sql.drop_blob_reference, params)
        if not rows or int(rows[0][0]) > 0:
            return None
        gone = await self._write(self.sql.delete_unused_blob, params)
        return self._blob(gone[0]) if gone else None

    async def has_blob(self, tenant: str, hash: str) -> bool:
        return bool(await self._read(self.sql.blob_exists, {"tenant": tenant, "hash": hash}))

    # -- asset records --------------------------------------------------------------------------------
    async def insert_asset(self, asset: Asset) -> Asset | None:
        params: dict[str, Any] = {
            "id": asset.id,
            "tenant": asset.tenant,
            "hash": asset.hash,
            "size": asset.size,
            "content_type": asset.content_type,
            "file_path": asset.file_path,
            "folder": asset.file.folder,
            "key": asset.file.key,
            "job_id": asset.job_id,
            "tags": self.codec.dump_json(list(asset.tags)),
            **self._now(),
        }
        rows = await self._write(self.sql.insert_asset, params)
        return self._asset(rows[0]) if rows else None

    async def insert_assets(self, assets: Sequence[Asset]) -> None:
        for asset in assets:
            await self.insert_asset(asset)

    async def get_asset(self, asset_id: str, tenant: str | None = None) -> Asset:
        rows = await self._read(self.sql.get_asset, {"id": asset_id, "tenant": tenant})
        if not rows:
            raise NotFound(f"asset {asset_id} not found")
        return self._asset(rows[0])

    async def delete_asset(self, asset_id: str, tenant: str | None = None) -> Asset:
        rows = await self._write(self.sql.delete_asset, {"id": asset_id, "tenant": tenant})
        if not rows:
            raise NotFound(f"asset {asset_id} not found")
        return self._asset(rows[0])

    # -- model files ----------------------------------------------------------------------------------
    async def put_model_file(self, model: ModelFile) -> tuple[ModelFile, bool]:
        params = {
            "sha256": model.sha256,
            "blake3": model.blake3,
            "folder": model.folder,
            "name": model.name,
            "size": model.size,
            "file_folder": model.file.folder,
            "file_key": model.file.key,
            "tenant": model.tenant,
            **self._now(),
        }
        rows = await self._write(self.sql.put_model_file, params)
        if rows:
            return self._model_file(rows[0]), True
        existing = await self._read(self.sql.model_file_at, params)
        if not existing:
            raise StoreError(f"model file {model.folder}/{model.name} could be neither stored nor read")
        return self._model_file(existing[0]), False

    async def find_model_file(self, sha256: str) -> ModelFile | None:
        rows = await self._read(self.sql.model_file_by_sha256, {"sha256": sha256})
        return self._model_file(rows[0]) if rows else None

    async def list_model_files(self, folder: str | None = None) -> list[ModelFile]:
        return [self._model_file(row) for row in await self._read(self.sql.model_files, {"folder": folder})]
