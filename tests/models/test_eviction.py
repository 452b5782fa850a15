"""The disk budget through the whole service: least recently used files go, but never one that a pool
manifest, a queued task or a running task needs (the workers read their folders strictly, so a file removed
under a task would fail it with ComfyUI's value_not_in_list)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from file_server import FileServer, sha256
from models_helpers import EMULATOR_COMMAND, model_graph, pool, service, service_settings

LORA_BYTES = 100_000


@pytest.mark.slow
async def test_eviction_never_removes_a_file_a_queued_or_running_task_needs(
    tmp_path: Path, file_server: FileServer
) -> None:
    checkpoint = os.urandom(50_000)
    file_server.files["base.safetensors"] = checkpoint
    manifest = [
        {"url": file_server.url("base.safetensors"), "sha256": sha256(checkpoint), "folder": "checkpoints"}
    ]
    specs = {}
    for index in range(1, 5):
        data = os.urandom(LORA_BYTES)
        file_server.files[f"l{index}.safetensors"] = data
        specs[index] = {
            "url": file_server.url(f"l{index}.safetensors"),
            "sha256": sha256(data),
            "folder": "loras",
        }
    budget = len(checkpoint) + 2 * LORA_BYTES + LORA_BYTES // 2  # the checkpoint and two LoRAs
    slow = pool(
        manifest,
        min_workers=1,
        max_workers=1,
        settings={"command": [*EMULATOR_COMMAND, "--prompt-time", "0.2"]},
    )
    async with service(tmp_path, service_settings(tmp_path, [slow], cache_budget_bytes=budget)) as svc:
        # LoRA 1 is needed again by the fourth task, which waits behind the others (a lower priority): while
        # it waits, LoRA 1 stays, though it is the least recently used file when LoRA 3 needs room.
        ids = []
        for seed, (index, priority) in enumerate([(1, 1), (2, 1), (3, 1), (1, 0)]):
            graph = model_graph("base.safetensors", f"l{index}.safetensors", seed=seed)
            body = {"payload": graph, "models": [specs[index]], "priority": priority}
            response = await svc.http.post("/api/v1/tasks", json=body)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        ended = [await svc.wait_task(task_id, within=60) for task_id in ids]
        assert [task["status"] for task in ended] == ["completed"] * 4, [task["error"] for task in ended]
        assert [file_server.requests[f"l{index}.safetensors"] for index in (1, 2, 3)] == [1, 1, 1]
        # Nothing needs the LoRAs now: the next download makes room by evicting the least recently used.
        body = {"payload": model_graph("base.safetensors", "l4.safetensors", seed=9), "models": [specs[4]]}
        response = await svc.http.post("/api/v1/tasks", json=body)
        assert (await svc.wait_task(response.json()["id"], within=60))["status"] == "completed"
        [host] = (await svc.http.get("/api/v1/models")).json()["hosts"]
        held = {entry["sha256"] for entry in host["files"]}
        assert host["used_bytes"] <= budget
        assert sha256(checkpoint) in held  # the manifest's file is pinned
        assert specs[4]["sha256"] in held
        assert len(held) == 3
        metrics = (await svc.http.get("/metrics")).text
        assert "comfyfleet_model_evictions_total" in metrics
