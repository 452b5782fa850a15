"""kill -9 of ``comfyfleet serve`` in the middle of a model download: the restarted service resumes the
download (``Range`` from what the ``.part`` file holds), and the task completes once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest
from file_server import FileServer, sha256
from models_helpers import model_graph, pool, service_settings

from comfyfleet.models.cache import ModelCache
from support import ServeProcess, eventually


@pytest.mark.slow
async def test_kill_9_during_a_download_resumes_it_after_restart_and_the_task_completes_once(
    tmp_path: Path, file_server: FileServer
) -> None:
    checkpoint, lora = os.urandom(64 * 1024), os.urandom(2 * 1024 * 1024)
    file_server.files.update({"base.safetensors": checkpoint, "style.safetensors": lora})
    manifest = [
        {"url": file_server.url("base.safetensors"), "sha256": sha256(checkpoint), "folder": "checkpoints"}
    ]
    settings = service_settings(tmp_path, [pool(manifest, min_workers=1, max_workers=1)])
    settings.pop("port")
    spec = {"url": file_server.url("style.safetensors"), "sha256": sha256(lora), "folder": "loras"}
    file_server.hold_at["style.safetensors"] = 900_000

    part = ModelCache(Path(settings["models"]["cache_dir"]), budget_bytes=1).part_path(sha256(lora))
    first = ServeProcess(tmp_path, config=settings, name="before-kill").start()
    try:
        async with httpx.AsyncClient(base_url=await first.wait_ready(), timeout=30) as http:
            await eventually(lambda: _a_ready_worker(http))
            body = {"payload": model_graph("base.safetensors", "style.safetensors"), "models": [spec]}
            response = await http.post("/api/v1/tasks", json=body)
            assert response.status_code == 201, response.text
            task_id = response.json()["id"]
            await asyncio.to_thread(file_server.holding.wait, 30)
            await eventually(lambda: _holds(part, 900_000))  # what was sent is on disk
            first.kill()  # SIGKILL mid-download: no shutdown code runs
    finally:
        first.kill()
    assert first.process.returncode == -signal.SIGKILL
    kept = part.stat().st_size
    assert kept == 900_000
    del file_server.hold_at["style.safetensors"]
    file_server.release.set()

    second = ServeProcess(tmp_path, config=settings, name="after-restart").start()
    try:
        async with httpx.AsyncClient(base_url=await second.wait_ready(), timeout=30) as http:

            async def ended() -> dict[str, object] | None:
                task: dict[str, object] = (await http.get(f"/api/v1/tasks/{task_id}")).json()
                return task if task["status"] in ("completed", "failed", "cancelled") else None

            task = await eventually(ended, within=60.0)
            assert task["status"] == "completed", task
            assert len(task["result"]["outputs"]) == 1  # type: ignore[index]
    finally:
        await second.stop_in_thread()
    assert file_server.ranges["style.safetensors"] == [None, f"bytes={kept}-"]  # resumed once, not refetched
    assert file_server.requests["base.safetensors"] == 1


async def _holds(part: Path, size: int) -> bool:
    return await asyncio.to_thread(lambda: part.exists() and part.stat().st_size >= size)


async def _a_ready_worker(http: httpx.AsyncClient) -> bool:
    workers = (await http.get("/api/v1/workers")).json()["workers"]
    return any(worker["state"] == "idle" for worker in workers)
