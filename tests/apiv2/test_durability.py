"""What a real ``comfyfleet serve`` acknowledged through Comfy API v2 survives ``kill -9``: jobs, their
asset inputs, and the idempotency keys they were submitted under."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path
from typing import Any

import pytest
from comfy_sdk import AsyncComfy, IdempotencyKeyReuse
from PIL import Image

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from support import ServeProcess


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(image: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 2.0},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "durable"}},
    }


@pytest.mark.slow
async def test_kill_9_after_a_2xx_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker slow to start each prompt, so the kill lands while the jobs are queued or running.
    options = EmulatorOptions(base_dir=str(tmp_path / "worker"), prompt_time_s=0.3)
    async with EmulatorServer(options) as worker:
        await worker.wait_ready()
        config = {
            "store": f"sqlite:///{tmp_path / 'durable.db'}",
            "outputs": str(tmp_path / "outputs"),
            "workers": [worker.url],
            "api_keys": [{"key": "key-alice", "tenant": "alice"}],
            "fleet": {"probe_interval_s": 0.5, "reconcile_interval_s": 0.2},
        }
        first = ServeProcess(tmp_path, config=config, name="before-kill").start()
        try:
            monkeypatch.setenv("COMFY_BASE_URL", await asyncio.to_thread(first.wait_listening))
            async with AsyncComfy(api_key="key-alice") as client:
                asset = client.assets.from_bytes(png(10), filename="photo.png")
                jobs = [
                    await client.submit(
                        client.workflows.from_json(upscale(asset)), idempotency_key=f"key-{i}"
                    )
                    for i in range(4)
                ]
            first.kill()  # SIGKILL right after the last 2xx: no shutdown code runs
        finally:
            first.kill()
        assert first.process.returncode == -signal.SIGKILL

        second = ServeProcess(tmp_path, config=config, name="after-kill").start()
        try:
            monkeypatch.setenv("COMFY_BASE_URL", await asyncio.to_thread(second.wait_listening))
            async with AsyncComfy(api_key="key-alice") as client:
                for index, job in enumerate(jobs):
                    again = await client.jobs.get(job.id)
                    await again.wait(timeout=60)
                    assert again.status == "succeeded", again.error
                    [output] = again.get_outputs("3")
                    with Image.open(io.BytesIO(await output.to_bytes())) as image:
                        assert image.size == (20, 20)
                    with pytest.raises(IdempotencyKeyReuse):
                        await client.submit(
                            client.workflows.from_json(upscale(asset)), idempotency_key=f"key-{index}"
                        )
                assert asset.id is not None
                kept = await client.assets.get(asset.id)
                assert kept.hash == asset.hash
                listed = [summary.id async for summary in client.list_jobs()]
                assert sorted(listed) == sorted(job.id for job in jobs)
        finally:
            second.kill()
