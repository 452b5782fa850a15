"""What a real ``comfyfleet serve`` acknowledged through Comfy API v2 survives ``kill -9``: jobs, their
asset inputs, and the idempotency keys they were submitted under."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from comfy_sdk import AsyncComfy, IdempotencyKeyReuse
from PIL import Image

from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer

STARTUP_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"api_listening url=(http://\S+)")


class Serve:
    """``python -m comfyfleet serve --config …`` as a child process, its log in a file."""

    def __init__(self, workdir: Path, config: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "comfyfleet", "serve", "--config", str(config), "--port", "0"],
                cwd=workdir,
                env={k: v for k, v in os.environ.items() if not k.startswith("COMFYFLEET_")},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                return match[1]
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            time.sleep(0.02)
        raise AssertionError(f"serve did not listen within {STARTUP_TIMEOUT_S} s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STARTUP_TIMEOUT_S)


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
        config = tmp_path / "comfyfleet.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "store": f"sqlite:///{tmp_path / 'durable.db'}",
                    "outputs": str(tmp_path / "outputs"),
                    "workers": [worker.url],
                    "api_keys": [{"key": "key-alice", "tenant": "alice"}],
                    "fleet": {"probe_interval_s": 0.5, "reconcile_interval_s": 0.2},
                }
            )
        )
        first = Serve(tmp_path, config, "before-kill")
        try:
            monkeypatch.setenv("COMFY_BASE_URL", await _wait(first))
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

        second = Serve(tmp_path, config, "after-kill")
        try:
            monkeypatch.setenv("COMFY_BASE_URL", await _wait(second))
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


async def _wait(serve: Serve) -> str:
    return await asyncio.to_thread(serve.wait_listening)
