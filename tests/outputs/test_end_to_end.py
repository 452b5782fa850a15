"""The whole service keeping its outputs in an S3 bucket: the seed example completes over a real emulator
worker and its PNG downloads through the API, read back from the bucket."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.outputs import open_outputs
from support import emulators, running_fleet, seed_workflow

from .test_s3 import closed_port


@pytest.mark.slow
async def test_seed_example_stores_its_png_in_s3_and_downloads_it(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = f"s3://{s3_bucket}/runs?endpoint_url={s3_endpoint}&region=us-east-1"
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url], outputs=outputs) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=7))
        task = await svc.wait_task(created["id"])
        assert task["status"] == "completed", task
        [output] = task["result"]["outputs"]
        assert output["content_type"] == "image/png"

        response = await svc.http.get(output["url"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert int(response.headers["content-length"]) == len(response.content) == output["size"]
        assert Image.open(io.BytesIO(response.content)).size == (512, 512)
        # The very bytes the worker wrote, kept in the bucket under the task's prefix.
        async with httpx.AsyncClient() as http:
            original = await http.get(
                f"{worker.url}/view",
                params={"filename": output["filename"], "subfolder": output["subfolder"], "type": "output"},
            )
        assert original.status_code == 200
        assert response.content == original.content
        key = f"runs/{task['id']}/{output['filename']}"
        stored = s3_admin.get_object(Bucket=s3_bucket, Key=key)
        assert stored["ContentType"] == "image/png"
        assert stored["Body"].read() == original.content
        assert (await svc.http.get(f"/api/v1/tasks/{task['id']}/outputs/missing.png")).status_code == 404

        # The store failing to answer is the service's trouble, said as such: a 503, never a 500.
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        app = svc.runtime.app
        app.services = dataclasses.replace(
            app.services,
            outputs=open_outputs(f"s3://{s3_bucket}/runs?endpoint_url=http://127.0.0.1:{closed_port()}"),
        )
        unavailable = await svc.http.get(output["url"])
        assert unavailable.status_code == 503
        assert unavailable.json()["error"] == "outputs_unavailable"


@pytest.mark.slow
async def test_a_missing_bucket_fails_the_task_after_its_retries(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    outputs = f"s3://{s3_bucket}-missing?endpoint_url={s3_endpoint}"
    async with (
        emulators(EmulatorOptions()) as (worker,),
        running_fleet(tmp_path, workers=[worker.url], outputs=outputs) as svc,
    ):
        created = await svc.submit(seed_workflow(seed=8), max_retries=1)
        task = await svc.wait_task(created["id"])
        assert task["status"] == "failed", task
        assert task["error_kind"] == "outputs_unavailable"
        assert "could not be stored" in task["error"]
        assert len(task["attempts"]) == 2
        assert worker.stats.executions.get(task["prompt_id"]) == 1
