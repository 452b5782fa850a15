"""Where people see models on demand: ``GET /api/v1/models`` (and its OpenAPI description), the SDK's
``models()``, ``comfyfleet models list``, the dashboard, ``/metrics``, and the blob route a remote worker
pulls verified files from."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest
from file_server import FileServer, sha256
from models_helpers import model_graph, pool, service, service_settings

from comfyfleet import AsyncClient
from support import eventually


@pytest.mark.slow
async def test_the_models_are_shown_by_the_api_sdk_cli_dashboard_and_metrics(
    tmp_path: Path, file_server: FileServer
) -> None:
    data = os.urandom(300_000)
    file_server.files["base.safetensors"] = data
    manifest = [
        {
            "url": file_server.url("base.safetensors") + "?token=s3cr3t",
            "sha256": sha256(data),
            "folder": "checkpoints",
        }
    ]
    async with service(tmp_path, service_settings(tmp_path, [pool(manifest, min_workers=1)])) as svc:

        async def ready() -> dict[str, object] | None:
            listing = (await svc.http.get("/api/v1/models")).json()
            states = [worker["models"] for worker in listing["pools"][0]["workers"]]
            return (
                listing if states and all(state and state["state"] == "ready" for state in states) else None
            )

        listing = await eventually(ready)
        [gpu] = listing["pools"]  # type: ignore[index]
        assert "s3cr3t" not in str(gpu["models"])  # URLs are shown redacted
        base_url = str(svc.http.base_url)
        async with AsyncClient(base_url) as client:
            assert (await client.models())["hosts"] == listing["hosts"]  # type: ignore[index]
            lora = os.urandom(10_000)
            file_server.files["sdk.safetensors"] = lora
            spec = {"url": file_server.url("sdk.safetensors"), "sha256": sha256(lora), "folder": "loras"}
            graph = model_graph("base.safetensors", "sdk.safetensors")
            task = await client.submit(graph, models=[spec], wait=30)
            assert task.status == "completed", task.raw
            assert task.raw["models"][0]["name"] == "sdk.safetensors"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfyfleet",
            "models",
            "list",
            "--server",
            base_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        text = out.decode()
        assert sha256(data)[:12] in text
        assert "checkpoints/base.safetensors" in text
        assert ": ready" in text
        page = (await svc.http.get("/")).text
        assert "checkpoints/base.safetensors" in page
        assert "293.0 KB" in page
        metrics = (await svc.http.get("/metrics")).text
        fetched = re.search(r"^comfyfleet_model_bytes_fetched_total (\S+)$", metrics, re.MULTILINE)
        assert fetched is not None
        assert float(fetched[1]) >= len(data)  # counters are the process's: other tests may have added
        openapi = (await svc.http.get("/openapi.json")).json()
        assert "/api/v1/models" in openapi["paths"]
        assert "/api/v1/models/blobs/{sha256}" in openapi["paths"]


async def test_the_blob_route_serves_verified_files_with_range_to_an_admin_or_a_worker_token(
    tmp_path: Path, file_server: FileServer
) -> None:
    data = os.urandom(200_000)
    file_server.files["lora.safetensors"] = data
    spec = {"url": file_server.url("lora.safetensors"), "sha256": sha256(data), "folder": "loras"}
    settings = service_settings(tmp_path, [pool(min_workers=0)])
    settings["api_keys"] = [{"key": "admin-key", "admin": True}, {"key": "tenant-key", "tenant": "alice"}]
    async with service(tmp_path, settings) as svc:
        models = svc.runtime.services.models
        assert models is not None
        from comfyfleet.models import ModelPolicy, ModelSpec

        await models.ensure(ModelSpec.model_validate(spec), ModelPolicy(allow_private=True))
        route = f"/api/v1/models/blobs/{sha256(data)}"
        token = models.worker_token("gpu-0123456789")
        whole = await svc.http.get(route, headers={"Authorization": f"Bearer {token}"})
        assert whole.status_code == 200
        assert whole.content == data
        part = await svc.http.get(
            route, headers={"Authorization": "Bearer admin-key", "Range": "bytes=100000-"}
        )
        assert part.status_code == 206
        assert part.content == data[100_000:]
        forged = token[:-4] + "0000"
        for headers, status in [
            ({}, 401),
            ({"Authorization": f"Bearer {forged}"}, 401),
            ({"Authorization": "Bearer tenant-key"}, 403),
        ]:
            response = await svc.http.get(route, headers=headers)
            assert response.status_code == status, response.text
            assert response.json()["code"] == status
        missing = await svc.http.get(
            f"/api/v1/models/blobs/{'0' * 64}", headers={"Authorization": "Bearer admin-key"}
        )
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
