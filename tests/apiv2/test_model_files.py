"""Model-file assets: safetensors only (the header read as data), allow-listed ComfyUI folders, no path out of
them, never overwritten; recorded by sha256 for the parts that put models on workers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.assets import InvalidAsset, ModelLibrary, ModelNameTaken, place_model_file
from comfyfleet.assets.paths import classify
from comfyfleet.assets.safetensors import read_header
from comfyfleet.config import DEFAULT_MODEL_FOLDERS
from support import Fleet, seed_workflow

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def safetensors(values: list[float], **metadata: str) -> bytes:
    data = struct.pack(f"<{len(values)}f", *values)
    header: dict[str, Any] = {"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_the_safetensors_header_is_read_and_checked() -> None:
    good = safetensors([1.0, 2.0], format="pt")
    assert read_header(io.BytesIO(good), len(good))["w"]["shape"] == [2]
    pickled = pickle.dumps({"weights": [1.0, 2.0]})
    raw = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    for bad in [
        pickled,  # a pickle (.ckpt renamed) is refused, never loaded
        good[:20],  # truncated header
        struct.pack("<Q", 10**12) + b"{}",  # a header length that does not fit
        struct.pack("<Q", len(raw)) + raw + b"\0" * 16,  # tensor offsets past the end of the file
        struct.pack("<Q", 4) + b"[12]",  # a header that is not an object
    ]:
        with pytest.raises(InvalidAsset):
            read_header(io.BytesIO(bad), len(bad))


def test_model_paths_stay_in_allow_listed_folders() -> None:
    folders = DEFAULT_MODEL_FOLDERS
    assert classify("models/loras/style/x.safetensors", folders).model_folder == "loras"
    assert classify("models/loras/style/x.safetensors", folders).name == "style/x.safetensors"
    assert classify("photo.png", folders).model_folder is None
    for path in [
        "models/custom_nodes/evil.safetensors",
        "models/configs/x.safetensors",
        "models/loras/../../x.safetensors",
        "models/loras/x.ckpt",
        "models/loras",
        "input/../models/loras/x.safetensors",
        "/models/loras/x.safetensors",
    ]:
        with pytest.raises(InvalidAsset):
            classify(path, folders)


def test_placing_a_model_file_never_escapes_nor_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "models"
    data = safetensors([1.0])
    placed = place_model_file(
        root, "loras", "style/x.safetensors", data, allowed_folders=DEFAULT_MODEL_FOLDERS
    )
    assert placed == (root / "loras" / "style" / "x.safetensors").resolve()
    assert placed.read_bytes() == data
    # The same bytes again are fine; other bytes under the name are refused, the file untouched.
    place_model_file(root, "loras", "style/x.safetensors", data, allowed_folders=DEFAULT_MODEL_FOLDERS)
    with pytest.raises(ModelNameTaken):
        place_model_file(
            root, "loras", "style/x.safetensors", safetensors([2.0]), allowed_folders=DEFAULT_MODEL_FOLDERS
        )
    assert placed.read_bytes() == data
    # A symlinked folder leading out of the model folder is refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "loras" / "link")
    with pytest.raises(InvalidAsset):
        place_model_file(root, "loras", "link/y.safetensors", data, allowed_folders=DEFAULT_MODEL_FOLDERS)
    assert list(outside.iterdir()) == []
    for folder, name in [("custom_nodes", "x.safetensors"), ("loras", "../x.safetensors"), ("loras", "x.pt")]:
        with pytest.raises(InvalidAsset):
            place_model_file(root, folder, name, data, allowed_folders=DEFAULT_MODEL_FOLDERS)
    assert sorted(p.name for p in (root / "loras").rglob("*")) == ["link", "style", "x.safetensors"]


def blob_folders(fleet: Fleet) -> list[Path]:
    return sorted(Path(fleet.settings.outputs).glob("_blob-*"))


async def upload_model(fleet: Fleet, data: bytes, file_path: str, headers: dict[str, str] = ALICE) -> Any:
    return await fleet.http.post(
        "/api/v2/assets",
        data={"content_type": "application/octet-stream", "file_path": file_path},
        files={"file": ("x.safetensors", data, "application/octet-stream")},
        headers=headers,
    )


async def test_an_uploaded_model_file_is_recorded_by_sha256(fleet: Fleet) -> None:
    data = safetensors([0.5, 0.25])
    answer = await upload_model(fleet, data, "models/loras/detail.safetensors")
    assert answer.status_code == 201, answer.text
    library = ModelLibrary(fleet.runtime.store, fleet.runtime.services.outputs)
    model = await library.find_model(hashlib.sha256(data).hexdigest())
    assert model is not None
    assert (model.folder, model.name, model.size) == ("loras", "detail.safetensors", len(data))
    assert model.blake3 == answer.json()["hash"]
    assert [m.name for m in await library.list_models("loras")] == ["detail.safetensors"]
    read = b"".join([chunk async for chunk in library.read(model)])
    assert read == data
    # Deleting the asset keeps the model: the fleet's record holds its own reference to the bytes.
    assert (
        await fleet.http.delete(f"/api/v2/assets/{answer.json()['id']}", headers=ALICE)
    ).status_code == 204
    assert b"".join([chunk async for chunk in library.read(model)]) == data

    # Another tenant's upload under the same name: the same bytes are fine, other bytes are refused.
    same = await upload_model(fleet, data, "models/loras/detail.safetensors", BOB)
    assert same.status_code == 201
    other = await upload_model(fleet, safetensors([9.0]), "models/loras/detail.safetensors", BOB)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "model_name_taken"


async def test_a_model_upload_must_be_safetensors_in_an_allowed_folder(fleet: Fleet) -> None:
    pickled = pickle.dumps({"w": 1})
    for data, path in [
        (pickled, "models/checkpoints/evil.safetensors"),
        (safetensors([1.0]), "models/custom_nodes/evil.safetensors"),
        (safetensors([1.0]), "models/checkpoints/evil.ckpt"),
        (safetensors([1.0]), "models/checkpoints/../../evil.safetensors"),
    ]:
        answer = await upload_model(fleet, data, path)
        assert answer.status_code == 422, path
        assert answer.json()["error"]["code"] == "invalid_asset"
    assert blob_folders(fleet) == []


async def test_a_reference_to_a_model_asset_becomes_its_name_in_its_folder(fleet: Fleet) -> None:
    data = safetensors([1.0, 1.0, 1.0])
    model = (await upload_model(fleet, data, "models/checkpoints/mine.safetensors")).json()
    graph = seed_workflow(steps=2)
    graph["4"]["inputs"]["ckpt_name"] = {"__type": "core/ASSET", "info": {"id": model["id"]}}
    created = await fleet.http.post("/api/v2/jobs", json={"workflow": graph}, headers=ALICE)
    assert created.status_code == 201, created.text
    workflow = (await fleet.http.get(f"/api/v2/jobs/{created.json()['id']}/workflow", headers=ALICE)).json()
    assert workflow["workflow"]["4"]["inputs"]["ckpt_name"] == "mine.safetensors"
    # Uploaded as an input file first, the same bytes become a model through from-hash (header checked then).
    text = await fleet.http.post(
        "/api/v2/assets",
        data={"content_type": "text/plain", "file_path": "notes.txt"},
        files={"file": ("notes.txt", b"not a model at all", "text/plain")},
        headers=ALICE,
    )
    minted = await fleet.http.post(
        "/api/v2/assets/from-hash",
        json={"hash": text.json()["hash"], "file_path": "models/loras/notes.safetensors"},
        headers=ALICE,
    )
    assert minted.status_code == 422
    assert minted.json()["error"]["code"] == "invalid_asset"
