"""The asset service: uploads deduplicated per tenant, records minted over bytes already kept, reads with
ranges, deletion, a job's outputs as assets, and ``core/ASSET`` references resolved for a submission.

Bytes live in the output store (local directory or S3), each blob in a folder of its own (``_blob-…``, key
``content``) so that it can be removed alone; a job's outputs stay where the dispatcher put them (the task's
folder). The store keeps the records (``store.AssetRecords``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, BinaryIO

from comfyfleet.assets.errors import (
    AssetInUse,
    AssetNotFound,
    AssetsUnavailable,
    BlobNotFound,
    HashMismatch,
    InvalidAsset,
    MissingAsset,
)
from comfyfleet.assets.hashing import CHUNK, Digest, hash_file, normal_hash
from comfyfleet.assets.models import ModelLibrary
from comfyfleet.assets.paths import Placement, classify, input_name
from comfyfleet.assets.references import find_references, reference_id, replace_references
from comfyfleet.assets.safetensors import MAX_HEADER_BYTES, read_header
from comfyfleet.domain import Asset, Blob, StoredFile, Task, TaskStatus
from comfyfleet.outputs import OutputNotFound, OutputsError, OutputStore
from comfyfleet.store import NotFound, Store

logger = logging.getLogger(__name__)

BLOB_KEY = "content"
# Output asset ids are derived from the task and file name, so every replica names them alike.
_OUTPUTS = uuid.UUID("6c1f3a52-27b5-4c8e-9d0c-5e4a5b1f0c11")
_ENSURED_TASKS = 4096
# type/subtype in RFC 9110's token characters, with optional parameters: what a Content-Type header may say.
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;[\x20-\x7e]*)?$")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A graph whose references became file names; ``inputs``: the files that must travel with it, by the
    name the graph now holds."""

    graph: dict[str, Any]
    inputs: list[tuple[str, Asset]]


@dataclass(frozen=True, slots=True)
class OutputAsset:
    """One output of a job (an entry of the task's ``result.outputs``) and its asset."""

    output: dict[str, Any]
    asset: Asset


def media_type(declared: str | None, file_path: str | None) -> str:
    """The content type an asset is served with: the one declared when it is a media type (``image/png``),
    else the one its name suggests, else ``application/octet-stream``."""
    if declared and _MEDIA_TYPE.match(declared.strip()):
        return declared.strip()
    guessed = mimetypes.guess_type(file_path)[0] if file_path else None
    return guessed or "application/octet-stream"


def output_asset_id(task_id: str, filename: str) -> str:
    return str(uuid.uuid5(_OUTPUTS, f"{task_id}/{filename}"))


class AssetService:
    def __init__(self, store: Store, outputs: OutputStore | None, *, model_folders: Collection[str]) -> None:
        self._store = store
        self._outputs = outputs
        self.model_folders = frozenset(model_folders)
        self.models = ModelLibrary(store, outputs)
        self._ensured: OrderedDict[str, None] = OrderedDict()

    def _output_store(self) -> OutputStore:
        if self._outputs is None:
            raise AssetsUnavailable("this server has no output store to keep assets in")
        return self._outputs

    # -- creating ---------------------------------------------------------------------------------
    async def upload(
        self,
        tenant: str,
        source: BinaryIO,
        *,
        content_type: str,
        file_path: str,
        expected_hash: str | None = None,
        tags: Sequence[str] = (),
    ) -> tuple[Asset, bool]:
        """Keep the bytes of ``source`` (a seekable file) for ``tenant``: a new blob, or the blob it already
        has of the same bytes. Return the new asset record and whether its bytes were new."""
        placement = classify(file_path, self.model_folders)
        content_type = media_type(content_type, file_path)
        digest = await asyncio.to_thread(hash_file, source)
        if expected_hash is not None and normal_hash(expected_hash) != digest.blake3:
            raise HashMismatch(
                "expected_hash is not the blake3 hash of the bytes received; nothing was stored"
            )
        if placement.model_folder is not None:
            await asyncio.to_thread(read_header, source, digest.size)
        blob = await self._store.take_blob(tenant, digest.blake3)
        created = False
        if blob is None:
            blob, created = await self._keep_blob(tenant, digest, source, content_type)
        return await self._mint(tenant, blob, placement, content_type, file_path, tags), created

    async def from_hash(
        self, tenant: str, hash_text: str, *, file_path: str | None, tags: Sequence[str] = ()
    ) -> Asset:
        """A new record over bytes ``tenant`` uploaded before (:class:`BlobNotFound` otherwise)."""
        placement = classify(file_path, self.model_folders) if file_path is not None else None
        hash_ = normal_hash(hash_text)
        blob = await self._store.take_blob(tenant, hash_) if hash_ is not None else None
        if blob is None:
            raise BlobNotFound(f"no blob {hash_text[:80]!r} this account may use")
        if placement is not None and placement.model_folder is not None:
            try:
                await self._check_stored_model(blob)
            except BaseException:
                await self._drop(blob.tenant, blob.hash)
                raise
        content_type = media_type(None, file_path)
        return await self._mint(tenant, blob, placement, content_type, file_path, tags)

    async def has_blob(self, tenant: str, hash_text: str) -> bool:
        hash_ = normal_hash(hash_text)
        return hash_ is not None and await self._store.has_blob(tenant, hash_)

    async def _keep_blob(
        self, tenant: str, digest: Digest, source: BinaryIO, content_type: str
    ) -> tuple[Blob, bool]:
        outputs = self._output_store()
        owner = hashlib.sha256(tenant.encode()).hexdigest()[:12]
        folder = f"_blob-{owner}-{digest.blake3.removeprefix('blake3:')[:32]}-{uuid.uuid4().hex[:8]}"
        try:
            await outputs.put(
                folder, BLOB_KEY, _chunks_of(source), content_type or "application/octet-stream"
            )
        except OutputsError as exc:
            raise AssetsUnavailable(f"the output store failed to keep the upload: {exc}") from exc
        blob = Blob(tenant, digest.blake3, digest.sha256, digest.size, StoredFile(folder, BLOB_KEY))
        kept, ours = await self._store.put_blob(blob)
        if not ours:
            # The same bytes were stored at the same moment by another request: keep theirs only.
            await self._remove_bytes(blob.file)
        return kept, ours

    async def _mint(
        self,
        tenant: str,
        blob: Blob,
        placement: Placement | None,
        content_type: str,
        file_path: str | None,
        tags: Sequence[str],
    ) -> Asset:
        """A record over ``blob`` (one reference of it taken for this record already)."""
        try:
            if placement is not None and placement.model_folder is not None:
                await self.models.record(tenant, blob, placement.model_folder, placement.name)
            asset = Asset(
                id=str(uuid.uuid4()),
                tenant=tenant,
                hash=blob.hash,
                size=blob.size,
                content_type=content_type or "application/octet-stream",
                file_path=file_path,
                file=blob.file,
                created_at=datetime.now(UTC),
                tags=tuple(tags),
            )
            stored = await self._store.insert_asset(asset)
        except BaseException:
            await self._drop(blob.tenant, blob.hash)
            raise
        return stored or asset

    async def _check_stored_model(self, blob: Blob) -> None:
        """The safetensors check, on bytes kept before (uploaded as something else)."""
        head = bytearray()
        async for chunk in self.read_file(blob.file):
            head.extend(chunk)
            if len(head) >= 8 and len(head) >= 8 + min(int.from_bytes(head[:8], "little"), MAX_HEADER_BYTES):
                break
        await asyncio.to_thread(read_header, BytesIO(bytes(head)), blob.size)

    # -- reading and deleting ---------------------------------------------------------------------
    async def get(self, asset_id: str, tenant: str | None) -> Asset:
        try:
            return await self._store.get_asset(asset_id, tenant)
        except NotFound:
            raise AssetNotFound(f"no asset {asset_id[:80]}") from None

    async def delete(self, asset_id: str, tenant: str | None) -> None:
        asset = await self.get(asset_id, tenant)
        if asset.job_id is not None:
            raise AssetInUse("this asset is a job's output; it is kept with the job")
        try:
            await self._store.delete_asset(asset_id, tenant)
        except NotFound:
            raise AssetNotFound(f"no asset {asset_id[:80]}") from None
        if asset.hash is not None:
            await self._drop(asset.tenant, asset.hash)

    async def _drop(self, tenant: str, hash_: str) -> None:
        gone = await self._store.drop_blob(tenant, hash_)
        if gone is not None:
            await self._remove_bytes(gone.file)

    async def _remove_bytes(self, file: StoredFile) -> None:
        try:
            await self._output_store().delete_task(file.folder)
        except OutputsError as exc:
            # The record is gone already; the bytes are only litter now.
            logger.warning("asset_bytes_not_removed folder=%s error=%s", file.folder, exc)

    async def read_file(
        self, file: StoredFile, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes ``start`` to ``end`` (inclusive; None: to the end) of a stored file."""
        position = 0
        try:
            async for chunk in self._output_store().read(file.folder, file.key):
                chunk_end = position + len(chunk)
                if chunk_end > start and (end is None or position <= end):
                    low = max(start - position, 0)
                    high = len(chunk) if end is None else min(end - position + 1, len(chunk))
                    yield chunk[low:high]
                position = chunk_end
                if end is not None and position > end:
                    return
        except OutputNotFound as exc:
            raise AssetNotFound("the asset's bytes are no longer stored") from exc

    # -- jobs -------------------------------------------------------------------------------------
    async def job_outputs(self, task: Task) -> list[OutputAsset]:
        """A finished job's output files as assets (their records are made on first sight)."""
        if task.status is not TaskStatus.COMPLETED or not isinstance(task.result, dict):
            return []
        found = []
        for output in task.result.get("outputs") or []:
            if not isinstance(output, dict) or not isinstance(output.get("filename"), str):
                continue
            filename = output["filename"]
            asset = Asset(
                id=output_asset_id(task.id, filename),
                tenant=task.tenant,
                hash=None,
                size=int(output.get("size") or 0),
                content_type=str(output.get("content_type") or "application/octet-stream"),
                file_path=filename,
                file=StoredFile(task.id, filename),
                created_at=task.completed_at or task.updated_at,
                job_id=task.id,
            )
            found.append(OutputAsset(output, asset))
        if found and task.id not in self._ensured:
            await self._store.insert_assets([item.asset for item in found])
            self._ensured[task.id] = None
            while len(self._ensured) > _ENSURED_TASKS:
                self._ensured.popitem(last=False)
        return found

    async def resolve(self, graph: dict[str, Any], tenant: str) -> Resolved:
        """``graph`` with every ``core/ASSET`` reference replaced by a file name: a model file's name in its
        folder, any other asset's name among the task's inputs. :class:`MissingAsset` names every reference
        that is malformed or not one of ``tenant``'s assets."""
        references = list(find_references(graph))
        if not references:
            return Resolved(graph, [])
        assets: dict[str, Asset] = {}
        missing: list[str] = []
        for reference in references:
            asset_id = reference_id(reference)
            if asset_id is None:
                missing.append("(malformed reference)")
                continue
            if asset_id in assets or asset_id in missing:
                continue
            try:
                assets[asset_id] = await self._store.get_asset(asset_id, tenant)
            except NotFound:
                missing.append(asset_id)
        if missing:
            raise MissingAsset(
                f"unknown or malformed core/ASSET reference(s): {', '.join(missing[:10])}", missing
            )
        names: dict[str, str] = {}
        inputs: list[tuple[str, Asset]] = []
        for asset_id, asset in assets.items():
            model = self.model_name(asset)
            if model is not None:
                names[asset_id] = model
                continue
            names[asset_id] = input_name(asset.id, asset.file_path)
            inputs.append((names[asset_id], asset))
        resolved = replace_references(graph, lambda reference: names[str(reference_id(reference))])
        return Resolved(resolved, inputs)

    def model_name(self, asset: Asset) -> str | None:
        """A model asset's name within its folder (what ComfyUI's loaders take), else None."""
        if not asset.file_path or not asset.file_path.startswith("models/"):
            return None
        try:
            placement = classify(asset.file_path, self.model_folders)
        except InvalidAsset:
            return None
        return placement.name if placement.model_folder is not None else None


async def _chunks_of(source: BinaryIO) -> AsyncIterator[bytes]:
    source.seek(0)
    while chunk := await asyncio.to_thread(source.read, CHUNK):
        yield chunk
