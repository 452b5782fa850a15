"""The SQL of the asset records (Comfy API v2's assets, their blobs, the fleet's model files), written once for
both dialects like the rest of ``_statements.py``."""

from __future__ import annotations

from functools import cached_property

ASSET_COLUMNS = "id, tenant, hash, size, content_type, file_path, folder, key, job_id, tags, created_at"
BLOB_COLUMNS = "tenant, hash, sha256, size, folder, key"
MODEL_COLUMNS = "sha256, blake3, folder, name, size, file_folder, file_key, tenant, created_at"
_OF_TENANT = "tenant = :tenant AND hash = :hash"


class AssetStatements:
    """Mixed into :class:`~comfyfleet.store._statements.Statements`; uses its ``now``."""

    now: str

    # -- blobs: a reference count per tenant and hash ------------------------------------------------
    take_blob = (
        f"UPDATE asset_blobs SET refs = refs + 1 WHERE {_OF_TENANT} AND refs > 0 RETURNING {BLOB_COLUMNS}"
    )

    @cached_property
    def put_blob(self) -> str:
        """A new blob with one reference, or one more reference to the live blob of the same hash (its bytes,
        not these, are then the ones kept). Nothing when the blob of that hash is being removed."""
        return (
            "INSERT INTO asset_blobs (tenant, hash, sha256, size, folder, key, refs, created_at) "
            f"VALUES (:tenant, :hash, :sha256, :size, :folder, :key, 1, {self.now}) "
            "ON CONFLICT (tenant, hash) DO UPDATE SET refs = asset_blobs.refs + 1 WHERE asset_blobs.refs > 0 "
            f"RETURNING {BLOB_COLUMNS}"
        )

    drop_blob_reference = (
        f"UPDATE asset_blobs SET refs = refs - 1 WHERE {_OF_TENANT} AND refs > 0 RETURNING refs"
    )
    delete_unused_blob = f"DELETE FROM asset_blobs WHERE {_OF_TENANT} AND refs = 0 RETURNING {BLOB_COLUMNS}"
    blob_exists = f"SELECT 1 FROM asset_blobs WHERE {_OF_TENANT} AND refs > 0"

    # -- asset records ---------------------------------------------------------------------------------
    @cached_property
    def insert_asset(self) -> str:
        return (
            f"INSERT INTO assets ({ASSET_COLUMNS}) VALUES (:id, :tenant, :hash, :size, :content_type, "
            f":file_path, :folder, :key, :job_id, :tags, {self.now}) ON CONFLICT (id) DO NOTHING "
            f"RETURNING {ASSET_COLUMNS}"
        )

    get_asset = f"SELECT {ASSET_COLUMNS} FROM assets WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant)"
    delete_asset = (
        f"DELETE FROM assets WHERE id = :id AND (CAST(:tenant AS TEXT) IS NULL OR tenant = :tenant) "
        f"RETURNING {ASSET_COLUMNS}"
    )

    # -- model files -----------------------------------------------------------------------------------
    @cached_property
    def put_model_file(self) -> str:
        return (
            f"INSERT INTO model_files ({MODEL_COLUMNS}) VALUES (:sha256, :blake3, :folder, :name, :size, "
            f":file_folder, :file_key, :tenant, {self.now}) ON CONFLICT (folder, name) DO NOTHING "
            f"RETURNING {MODEL_COLUMNS}"
        )

    model_file_at = f"SELECT {MODEL_COLUMNS} FROM model_files WHERE folder = :folder AND name = :name"
    model_file_by_sha256 = f"SELECT {MODEL_COLUMNS} FROM model_files WHERE sha256 = :sha256 ORDER BY created_at, folder, name LIMIT 1"
    model_files = (
        f"SELECT {MODEL_COLUMNS} FROM model_files WHERE (CAST(:folder AS TEXT) IS NULL OR folder = :folder) "
        "ORDER BY folder, name"
    )
