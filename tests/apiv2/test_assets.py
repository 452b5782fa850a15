"""Comfy API v2 assets through the official SDK: uploads deduplicated per tenant, used as a ``LoadImage``
input on whichever worker runs the job, the hash fast path, ranges, deletion, tenant isolation."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from comfy_low.errors import ApiError
from comfy_sdk import MissingAsset, NotFound
from PIL import Image

from support import Fleet, running_fleet, tiny_workflow

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale_workflow(image: Any) -> dict[str, Any]:
    """LoadImage → ImageScaleBy (twice the size) → SaveImage, with ``image`` (an asset handle) as LoadImage's file."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 2.0},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "upscaled"}},
    }


def blob_folders(fleet: Fleet) -> list[Path]:
    return sorted(Path(fleet.settings.outputs).glob("_blob-*"))


async def upload(fleet: Fleet, data: bytes, headers: dict[str, str], **fields: str) -> Any:
    form = {"content_type": "image/png", "file_path": "photo.png", **fields}
    return await fleet.http.post(
        "/api/v2/assets", data=form, files={"file": ("photo.png", data, "image/png")}, headers=headers
    )


async def test_an_asset_uploaded_from_bytes_or_a_file_is_a_load_image_input(
    sdk: Any, fleet: Fleet, tmp_path: Path
) -> None:
    on_disk = tmp_path / "wide.png"
    on_disk.write_bytes(png(30, 10, (10, 200, 10)))
    async with sdk() as client:
        for asset, size in [
            (client.assets.from_bytes(png(20, 12), filename="photo.png"), (40, 24)),
            (client.assets.from_file(on_disk), (60, 20)),
        ]:
            job = await client.run(client.workflows.from_json(upscale_workflow(asset)), timeout=30)
            [output] = job.get_outputs("3")
            with Image.open(io.BytesIO(await output.to_bytes())) as image:
                assert image.size == size
            assert asset.id is not None
            # The job ran the file the worker received; the graph names it in the task's own input folder.
            workflow = await job.get_workflow()
            assert workflow.graph["1"]["inputs"]["image"].endswith(".png")


async def test_the_same_bytes_are_kept_once_per_tenant(sdk: Any, fleet: Fleet) -> None:
    data = png(16, 16)
    async with sdk() as client:
        first = client.assets.from_bytes(data, filename="a.png")
        await first.commit()
        assert first.created_new is True
        second = client.assets.from_bytes(data, filename="b.png")  # the SDK probes by hash, then mints
        await second.commit()
        assert second.id != first.id
        assert second.created_new is False
        assert second.hash == first.hash
    again = await upload(fleet, data, ALICE)
    assert again.status_code == 200
    assert again.json()["created_new"] is False
    assert len(blob_folders(fleet)) == 1
    # Another tenant's upload of the same bytes is its own blob: dedup never crosses tenants.
    theirs = await upload(fleet, data, BOB)
    assert theirs.status_code == 201
    assert len(blob_folders(fleet)) == 2


async def test_a_declared_hash_must_match_the_bytes(fleet: Fleet) -> None:
    wrong = "blake3:" + "0" * 64
    answer = await upload(fleet, png(8, 8), ALICE, expected_hash=wrong)
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "hash_mismatch"
    assert blob_folders(fleet) == []


async def test_another_tenants_asset_cannot_be_seen_used_or_minted(sdk: Any, fleet: Fleet) -> None:
    data = png(12, 12)
    async with sdk("key-alice") as alice, sdk("key-bob") as bob:
        asset = alice.assets.from_bytes(data, filename="secret.png")
        await asset.commit()
        assert asset.id is not None
        with pytest.raises(NotFound):
            await bob.assets.get(asset.id)
        assert (await fleet.http.head(f"/api/v2/assets/by-hash/{asset.hash}", headers=BOB)).status_code == 404
        assert (
            await fleet.http.head(f"/api/v2/assets/by-hash/{asset.hash}", headers=ALICE)
        ).status_code == 200
        with pytest.raises(ApiError) as refused:
            await bob._low.asset_from_hash(asset.hash)
        assert (refused.value.http_status, refused.value.code) == (404, "blob_not_found")
        for path in (f"/api/v2/assets/{asset.id}", f"/api/v2/assets/{asset.id}/content"):
            assert (await fleet.http.get(path, headers=BOB)).status_code == 404
        assert (await fleet.http.delete(f"/api/v2/assets/{asset.id}", headers=BOB)).status_code == 404
        # Bob naming Alice's asset in his workflow: missing, as if it did not exist.
        reference = {"__type": "core/ASSET", "info": {"id": asset.id}}
        with pytest.raises(MissingAsset) as missing:
            await bob.submit(bob.workflows.from_json(upscale_workflow(reference)))
        assert missing.value.details["missing_ids"] == [asset.id]


async def test_an_unknown_or_malformed_reference_is_a_missing_asset(fleet: Fleet) -> None:
    for reference in [
        {"__type": "core/ASSET", "info": {"id": "00000000-0000-4000-8000-000000000000"}},
        {"__type": "core/ASSET", "info": {}},
        {"__type": "core/ASSET"},
    ]:
        body = {"workflow": upscale_workflow(reference)}
        answer = await fleet.http.post("/api/v2/jobs", json=body, headers=ALICE)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "missing_asset"


async def test_content_is_served_whole_or_by_range(fleet: Fleet) -> None:
    data = png(64, 64)
    asset = (await upload(fleet, data, ALICE)).json()
    path = f"/api/v2/assets/{asset['id']}/content"
    whole = await fleet.http.get(path, headers=ALICE)
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    size = len(data)
    for header, (first, last) in [
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, size - 1)),
        ("bytes=-5", (size - 5, size - 1)),
        (f"bytes=5-{size + 100}", (5, size - 1)),
    ]:
        answer = await fleet.http.get(path, headers={**ALICE, "Range": header})
        assert answer.status_code == 206, header
        assert answer.content == data[first : last + 1], header
        assert answer.headers["content-range"] == f"bytes {first}-{last}/{size}"
    past = await fleet.http.get(path, headers={**ALICE, "Range": f"bytes={size}-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{size}"
    metadata = (await fleet.http.get(f"/api/v2/assets/{asset['id']}", headers=ALICE)).json()
    assert metadata["url"].endswith(path)
    assert metadata["size_bytes"] == size


async def test_delete_removes_the_record_and_the_bytes_with_the_last_one(sdk: Any, fleet: Fleet) -> None:
    data = png(9, 9)
    first = (await upload(fleet, data, ALICE)).json()
    second = (await upload(fleet, data, ALICE)).json()
    assert len(blob_folders(fleet)) == 1
    assert (await fleet.http.delete(f"/api/v2/assets/{first['id']}", headers=ALICE)).status_code == 204
    assert (await fleet.http.get(f"/api/v2/assets/{first['id']}", headers=ALICE)).status_code == 404
    assert (await fleet.http.delete(f"/api/v2/assets/{first['id']}", headers=ALICE)).status_code == 404
    # The other record still holds the bytes.
    content = await fleet.http.get(f"/api/v2/assets/{second['id']}/content", headers=ALICE)
    assert content.content == data
    async with sdk() as client:
        await client.assets.delete(second["id"])
    assert blob_folders(fleet) == []
    assert (
        await fleet.http.head(f"/api/v2/assets/by-hash/{second['hash']}", headers=ALICE)
    ).status_code == 404


async def test_a_jobs_outputs_are_assets_kept_with_the_job(sdk: Any, fleet: Fleet) -> None:
    async with sdk() as client:
        job = await client.run(client.workflows.from_json(tiny_workflow()), timeout=30)
    [output] = job.get_outputs("2")
    asset = (await fleet.http.get(f"/api/v2/assets/{output.id}", headers=ALICE)).json()
    assert (asset["job_id"], asset["size_bytes"]) == (job.id, output.size_bytes)
    answer = await fleet.http.delete(f"/api/v2/assets/{output.id}", headers=ALICE)
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "asset_in_use"
    assert (await fleet.http.get(f"/api/v2/assets/{output.id}", headers=BOB)).status_code == 404


async def test_upload_refusals(fleet: Fleet) -> None:
    answer = await fleet.http.post("/api/v2/assets", json={"file": "x"}, headers=ALICE)
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_request")
    for file_path in ["../escape.png", "/etc/passwd", "a//b.png", "dir\\x.png"]:
        answer = await upload(fleet, png(4, 4), ALICE, file_path=file_path)
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_asset"), file_path
    answer = await fleet.http.post(
        "/api/v2/assets/from-hash", json={"hash": "blake3:" + "a" * 64}, headers=ALICE
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "blob_not_found")
    assert blob_folders(fleet) == []


async def test_a_client_cannot_name_a_stored_file_as_an_input(fleet: Fleet) -> None:
    """Only the v2 front door, having checked the asset is the caller's, makes stored inputs: an /api/v1 client
    naming a folder of the output store (another tenant's blob, say) is refused."""
    asset = (await upload(fleet, png(5, 5), BOB)).json()
    folder = blob_folders(fleet)[0].name
    body = {
        "payload": tiny_workflow(),
        "inputs": [
            {
                "name": "x.png",
                "url": "https://example.com/x.png",
                "stored": {"folder": folder, "key": "content"},
            }
        ],
    }
    answer = await fleet.http.post("/api/v1/tasks", json=body, headers=ALICE)
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_input"
    assert "stored" in answer.json()["message"]
    assert asset["id"]


async def test_an_upload_over_the_limit_is_refused(tmp_path: Path) -> None:
    settings = {"api_keys": [{"key": "key-alice", "tenant": "alice"}], "apiv2": {"max_upload_bytes": 4096}}
    async with running_fleet(tmp_path, workers=0, wait_workers=0, **settings) as small:
        answer = await upload(small, b"x" * 200_000, ALICE)
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "payload_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            yield (
                b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n"
            )
            for _ in range(100):
                yield b"y" * 10_000
            yield b"\r\n--zzz--\r\n"

        answer = await small.http.post(
            "/api/v2/assets",
            content=chunked(),
            headers={**ALICE, "Content-Type": "multipart/form-data; boundary=zzz"},
        )
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "payload_too_large"
        assert (await upload(small, png(4, 4), ALICE)).status_code == 201
        assert blob_folders(small) != []
