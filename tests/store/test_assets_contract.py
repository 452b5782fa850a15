"""The store's asset records and idempotency keys: the same behaviour on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from comfyfleet.domain import Asset, Blob, ModelFile, StoredFile
from comfyfleet.store import NotFound, Store

HASH = "blake3:" + "ab" * 32


def blob(tenant: str = "t", hash_: str = HASH, folder: str = "_blob-1") -> Blob:
    return Blob(tenant, hash_, "cd" * 32, 42, StoredFile(folder, "content"))


def asset(over: Blob, *, tenant: str | None = None, job_id: str | None = None) -> Asset:
    return Asset(
        id=str(uuid.uuid4()),
        tenant=tenant or over.tenant,
        hash=over.hash if job_id is None else None,
        size=over.size,
        content_type="image/png",
        file_path="photo.png",
        file=over.file,
        created_at=datetime.now(UTC),
        job_id=job_id,
        tags=("input",),
    )


async def test_a_blob_is_counted_and_removed_with_its_last_reference(store: Store) -> None:
    assert await store.take_blob("t", HASH) is None
    kept, ours = await store.put_blob(blob())
    assert ours
    assert kept == blob()
    # The same bytes stored again (another request, other folder): the first blob is kept, one more reference.
    again, ours = await store.put_blob(blob(folder="_blob-2"))
    assert not ours
    assert again.file == StoredFile("_blob-1", "content")
    assert await store.take_blob("t", HASH) == kept
    assert await store.has_blob("t", HASH)
    assert not await store.has_blob("other", HASH)
    assert await store.drop_blob("t", HASH) is None
    assert await store.drop_blob("t", HASH) is None
    assert await store.drop_blob("t", HASH) == kept  # the last one: the caller removes the bytes
    assert not await store.has_blob("t", HASH)
    assert await store.take_blob("t", HASH) is None
    assert await store.drop_blob("t", HASH) is None


async def test_blobs_are_per_tenant(store: Store) -> None:
    await store.put_blob(blob("a"))
    _, ours = await store.put_blob(blob("b", folder="_blob-b"))
    assert ours
    assert (await store.take_blob("b", HASH)).file.folder == "_blob-b"  # type: ignore[union-attr]


async def test_concurrent_references_are_never_lost(store: Store) -> None:
    await store.put_blob(blob())
    await asyncio.gather(*(store.take_blob("t", HASH) for _ in range(20)))
    drops = await asyncio.gather(*(store.drop_blob("t", HASH) for _ in range(21)))
    assert [gone for gone in drops if gone is not None] == [blob()]


async def test_asset_records_are_tenant_scoped(store: Store) -> None:
    record = asset(blob())
    stored = await store.insert_asset(record)
    assert stored is not None
    assert (stored.id, stored.hash, stored.tags, stored.file) == (record.id, HASH, ("input",), record.file)
    assert await store.insert_asset(record) is None  # an id is stored once
    assert (await store.get_asset(record.id, "t")).id == record.id
    assert (await store.get_asset(record.id)).id == record.id
    with pytest.raises(NotFound):
        await store.get_asset(record.id, "other")
    with pytest.raises(NotFound):
        await store.delete_asset(record.id, "other")
    assert (await store.delete_asset(record.id, "t")).id == record.id
    with pytest.raises(NotFound):
        await store.get_asset(record.id)


async def test_output_records_are_inserted_once(store: Store) -> None:
    outputs = [asset(blob(folder="task-1"), job_id="task-1") for _ in range(2)]
    await store.insert_assets(outputs)
    await store.insert_assets(outputs)
    for output in outputs:
        read = await store.get_asset(output.id, "t")
        assert (read.job_id, read.hash) == ("task-1", None)


async def test_model_files_are_never_overwritten(store: Store) -> None:
    model = ModelFile(
        sha256="ef" * 32,
        blake3=HASH,
        folder="loras",
        name="style/x.safetensors",
        size=42,
        file=StoredFile("_blob-1", "content"),
        tenant="t",
        created_at=datetime.now(UTC),
    )
    kept, created = await store.put_model_file(model)
    assert created
    assert (kept.folder, kept.name, kept.sha256) == ("loras", "style/x.safetensors", "ef" * 32)
    other = replace(model, sha256="00" * 32, tenant="u")
    kept, created = await store.put_model_file(other)
    assert not created
    assert kept.sha256 == "ef" * 32
    assert (await store.find_model_file("ef" * 32)).name == "style/x.safetensors"  # type: ignore[union-attr]
    assert await store.find_model_file("00" * 32) is None
    assert [m.name for m in await store.list_model_files("loras")] == ["style/x.safetensors"]
    assert await store.list_model_files("vae") == []


async def test_an_idempotency_key_is_claimed_once_until_it_expires(store: Store) -> None:
    assert await store.claim_idempotency_key("t", "k", "task-1", 3600) is None
    assert await store.claim_idempotency_key("t", "k", "task-2", 3600) == "task-1"
    assert await store.claim_idempotency_key("u", "k", "task-3", 3600) is None  # keys are per tenant
    await store.release_idempotency_key("t", "k", "task-2")  # not its holder: nothing happens
    assert await store.claim_idempotency_key("t", "k", "task-4", 3600) == "task-1"
    await store.release_idempotency_key("t", "k", "task-1")
    assert await store.claim_idempotency_key("t", "k", "task-5", 3600) is None
    # An expired claim is taken over by the next one, and swept.
    assert await store.claim_idempotency_key("t", "old", "task-6", 0.0) is None
    assert await store.claim_idempotency_key("t", "old", "task-7", 3600) is None
    assert await store.claim_idempotency_key("t", "gone", "task-8", 0.0) is None
    assert await store.purge_idempotency_keys() == 1
    assert await store.claim_idempotency_key("t", "gone", "task-9", 3600) is None


async def test_concurrent_claims_of_one_key_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.claim_idempotency_key("t", "race", f"task-{i}", 3600) for i in range(10))
    )
    assert results.count(None) == 1
    winner = f"task-{results.index(None)}"
    assert all(result in {None, winner} for result in results)
