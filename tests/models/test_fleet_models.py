"""Models on demand through the whole service: pool manifests put on workers before they are ready, tasks that
bring their own files, one download per host, and clear, final failures."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from file_server import FileServer, sha256
from models_helpers import model_graph, pool, service, service_settings, workers

from support import eventually

CHECKPOINT = os.urandom(256 * 1024)


@pytest.mark.slow
async def test_a_pool_manifest_is_on_every_worker_before_it_is_ready_and_fetched_once_per_host(
    tmp_path: Path, file_server: FileServer
) -> None:
    file_server.files["base.safetensors"] = CHECKPOINT
    manifest = [
        {"url": file_server.url("base.safetensors"), "sha256": sha256(CHECKPOINT), "folder": "checkpoints"}
    ]
    async with service(tmp_path, service_settings(tmp_path, [pool(manifest, min_workers=2)])) as svc:
        ready = await eventually(lambda: _ready(svc, 2))
        assert file_server.requests["base.safetensors"] == 1  # two workers, one download
        for worker in ready:
            assert worker["info"]["models"]["state"] == "ready"
            placed = Path(worker["info"]["models_dir"]) / "checkpoints" / "base.safetensors"
            assert placed.read_bytes() == CHECKPOINT
            async with httpx.AsyncClient(base_url=worker["endpoint"]) as comfy:
                info = (await comfy.get("/object_info/CheckpointLoaderSimple")).json()
            assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["base.safetensors"]
        response = await svc.http.post("/api/v1/tasks", json={"payload": model_graph("base.safetensors")})
        assert response.status_code == 201, response.text
        task = await svc.wait_task(response.json()["id"], within=60)
        assert task["status"] == "completed", task
        # A replacement worker on the same host: linked from the cache, no second download.
        first = ready[0]["id"]
        assert (await svc.http.delete(f"/api/v1/workers/{first}")).status_code == 200
        replaced = await eventually(lambda: _ready(svc, 2, without=first))
        assert all(worker["info"]["models"]["state"] == "ready" for worker in replaced)
        assert file_server.requests["base.safetensors"] == 1
        listing = (await svc.http.get("/api/v1/models")).json()
        [host] = listing["hosts"]
        [cached] = host["files"]
        assert cached["sha256"] == sha256(CHECKPOINT)
        assert cached["pinned"] is True
        assert cached["names"] == ["checkpoints/base.safetensors"]
        [gpu] = listing["pools"]
        assert {worker["models"]["state"] for worker in gpu["workers"]} == {"ready"}


@pytest.mark.slow
async def test_a_manifest_file_that_cannot_be_had_fails_the_start_with_the_reason(
    tmp_path: Path, file_server: FileServer
) -> None:
    file_server.files["base.safetensors"] = CHECKPOINT
    manifest = [
        {"url": file_server.url("base.safetensors"), "sha256": sha256(b"other"), "folder": "checkpoints"}
    ]
    async with service(tmp_path, service_settings(tmp_path, [pool(manifest, min_workers=1)])) as svc:

        async def failed() -> list[dict[str, Any]]:
            response = await svc.http.get("/api/v1/workers", params={"include_gone": "true"})
            return [worker for worker in response.json()["workers"] if worker["error"]]

        [worker, *_] = await eventually(failed)
        assert "model files:" in worker["error"]
        assert "sha256" in worker["error"]
        cache = tmp_path / "cache"
        assert not [path for path in cache.glob("sha256/*/*")]  # nothing unverified became visible
        assert not list((cache / "partial").iterdir())


async def _ready(svc: Any, count: int, without: str | None = None) -> list[dict[str, Any]] | None:
    ready = [
        worker
        for worker in await workers(svc)
        if worker["state"] in ("idle", "busy") and worker["id"] != without
    ]
    return ready if len(ready) >= count else None


def lora(file_server: FileServer, index: int) -> tuple[str, dict[str, Any]]:
    data = os.urandom(64 * 1024)
    name = f"style{index}.safetensors"
    file_server.files[name] = data
    return name, {"url": file_server.url(name), "sha256": sha256(data), "folder": "loras"}


def checkpoint(file_server: FileServer) -> list[dict[str, Any]]:
    file_server.files["base.safetensors"] = CHECKPOINT
    return [
        {"url": file_server.url("base.safetensors"), "sha256": sha256(CHECKPOINT), "folder": "checkpoints"}
    ]


@pytest.mark.slow
async def test_tasks_bring_their_own_loras_and_each_is_fetched_once(
    tmp_path: Path, file_server: FileServer
) -> None:
    manifest = checkpoint(file_server)
    # Both workers load the checkpoint as they start (the warm-up runs once the manifest is there), so both
    # are as good a place for any of the tasks below.
    warm = pool(manifest, min_workers=2, warmup=model_graph("base.safetensors"))
    async with service(tmp_path, service_settings(tmp_path, [warm])) as svc:
        await eventually(lambda: _ready(svc, 2))
        # One task first, held in the middle of its download: the task is fetching_models, with progress.
        name, spec = lora(file_server, 0)
        file_server.hold_at[name] = 1000
        response = await svc.http.post(
            "/api/v1/tasks", json={"payload": model_graph("base.safetensors", name), "models": [spec]}
        )
        assert response.status_code == 201, response.text
        first = response.json()["id"]
        assert response.json()["models"][0]["name"] == name
        async with svc.http.stream("GET", f"/api/v1/tasks/{first}/events") as events:
            await asyncio.to_thread(file_server.holding.wait, 30)
            task = await svc.task(first)
            assert (task["status"], task["phase"]) == ("running", "fetching_models")

            async def shown() -> bool:  # the dashboard's task page says so too
                return "fetching models 0/1" in (await svc.http.get(f"/tasks/{first}")).text

            await eventually(shown, within=10.0)
            file_server.release.set()
            seen = await _progress_event(events)
        assert seen["models"]["files"] == 1
        assert (await svc.wait_task(first, within=60))["status"] == "completed"
        # Eight tasks, eight LoRAs, two workers: each file fetched once, every task completed.
        loras = [lora(file_server, index) for index in range(1, 9)]
        ids = []
        for index, (name, spec) in enumerate(loras):
            body = {"payload": model_graph("base.safetensors", name, seed=index), "models": [spec]}
            response = await svc.http.post("/api/v1/tasks", json=body)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        ended = [await svc.wait_task(task_id, within=60) for task_id in ids]
        assert [task["status"] for task in ended] == ["completed"] * 8, [task["error"] for task in ended]
        assert {task["worker_id"] for task in ended} == {
            worker["id"] for worker in await _ready(svc, 2) or []
        }
        assert all(file_server.requests[name] == 1 for name, _ in loras)
        assert file_server.requests["base.safetensors"] == 1


async def _progress_event(events: httpx.Response) -> dict[str, Any]:
    kind = None
    async for line in events.aiter_lines():
        if line.startswith("event:"):
            kind = line.removeprefix("event:").strip()
        elif line.startswith("data:") and kind == "progress":
            data: dict[str, Any] = json.loads(line.removeprefix("data:"))
            if "models" in data:
                return data
    raise AssertionError("the event stream ended without a models progress event")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["sha256_mismatch", "not_found"])
async def test_a_task_model_that_cannot_be_had_fails_the_task_once_with_the_reason(
    tmp_path: Path, file_server: FileServer, failure: str
) -> None:
    manifest = checkpoint(file_server)
    name, spec = lora(file_server, 0)
    if failure == "sha256_mismatch":
        spec["sha256"], reason = sha256(b"not these bytes"), "sha256"
    else:
        spec["url"], reason = file_server.url("gone.safetensors"), "HTTP 404"
    async with service(
        tmp_path, service_settings(tmp_path, [pool(manifest, min_workers=1, max_workers=1)])
    ) as svc:
        await eventually(lambda: _ready(svc, 1))
        response = await svc.http.post(
            "/api/v1/tasks", json={"payload": model_graph("base.safetensors", name), "models": [spec]}
        )
        assert response.status_code == 201, response.text
        task = await svc.wait_task(response.json()["id"], within=60)
        assert (task["status"], task["error_kind"]) == ("failed", "model_unavailable")
        assert reason in task["error"]
        assert task["retry_count"] == 0
        served = file_server.requests[name] + file_server.requests["gone.safetensors"]
        assert served == 1  # not retried
        cache = tmp_path / "cache"
        assert [p.name for p in (cache / "sha256").rglob("*") if p.is_file()] == [sha256(CHECKPOINT)]
        assert not [p for p in (cache / "partial").iterdir()]


@pytest.mark.parametrize("failure", ["private_address", "pickle", "bad_sha256", "path_in_name"])
async def test_model_files_that_can_never_be_had_are_refused_at_the_door(
    tmp_path: Path, file_server: FileServer, failure: str
) -> None:
    name, spec = lora(file_server, 0)
    loc = ["body", "models", 0]
    if failure == "private_address":
        expected = "non-public address"
    elif failure == "pickle":
        spec["url"], expected = file_server.url("style.ckpt"), "pickle formats"
    elif failure == "bad_sha256":
        spec["sha256"], expected = "abc", "sha256 must be 64 hexadecimal digits"
    else:
        spec["name"], expected = "../../etc/x.safetensors", "plain file name"
    strict = pool(min_workers=0, max_workers=1, models_allow_private=False)
    async with service(tmp_path, service_settings(tmp_path, [strict])) as svc:
        response = await svc.http.post(
            "/api/v1/tasks", json={"payload": model_graph("base.safetensors", name), "models": [spec]}
        )
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "invalid_models"
        assert expected in body["message"]
        assert body["details"]["errors"][0]["loc"] == loc
    assert sum(file_server.requests.values()) == 0


def safetensors_file(values: list[float]) -> bytes:
    """A real (tiny) safetensors file: Comfy API v2 checks the header of an uploaded model."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.slow
async def test_a_task_brings_a_model_uploaded_through_comfy_api_v2(
    tmp_path: Path, file_server: FileServer
) -> None:
    manifest = checkpoint(file_server)
    data = safetensors_file([0.5, 0.25, 0.125])
    async with service(
        tmp_path, service_settings(tmp_path, [pool(manifest, min_workers=1, max_workers=1)])
    ) as svc:
        uploaded = await svc.http.post(
            "/api/v2/assets",
            data={"content_type": "application/octet-stream", "file_path": "models/loras/mine.safetensors"},
            files={"file": ("mine.safetensors", data, "application/octet-stream")},
        )
        assert uploaded.status_code in (200, 201), uploaded.text
        spec = {
            "url": f"asset://{sha256(data)}",
            "sha256": sha256(data),
            "folder": "loras",
            "name": "mine.safetensors",
        }
        response = await svc.http.post(
            "/api/v1/tasks",
            json={"payload": model_graph("base.safetensors", "mine.safetensors"), "models": [spec]},
        )
        assert response.status_code == 201, response.text
        task = await svc.wait_task(response.json()["id"], within=60)
        assert task["status"] == "completed", task
        [worker] = await _ready(svc, 1) or []
        placed = Path(worker["info"]["models_dir"]) / "loras" / "mine.safetensors"
        assert placed.read_bytes() == data
