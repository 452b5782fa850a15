"""The whole service (API, dispatcher, worker manager, model service) over a pool of emulator processes that
read their models folder strictly (``--models-dir {models_dir} --strict-models``), as real ComfyUI would."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from comfyfleet.config import load_settings
from comfyfleet.runtime import Runtime

T = TypeVar("T")
TERMINAL = {"completed", "failed", "cancelled"}
EMULATOR_COMMAND = [
    "{python}",
    "-m",
    "comfyfleet",
    "emulator",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--log-level",
    "warning",
    "--models-dir",
    "{models_dir}",
    "--strict-models",
]


def model_graph(checkpoint: str, lora: str | None = None, seed: int = 1) -> dict[str, Any]:
    """Checkpoint (and LoRA) → prompt → one sampler step on a tiny latent → decode → save."""
    model, clip = ["1", 0], ["1", 1]
    graph: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    }
    if lora is not None:
        graph["9"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
        model, clip = ["9", 0], ["9", 1]
    graph.update(
        {
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a bottle"}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": ["2", 0],
                    "negative": ["2", 0],
                    "latent_image": ["3", 0],
                    "seed": seed,
                    "steps": 1,
                    "cfg": 7.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "models"}},
        }
    )
    return graph


@dataclass
class Service:
    runtime: Runtime
    http: httpx.AsyncClient

    async def submit(self, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/api/v1/tasks", json=body)

    async def task(self, task_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def ended(self, task_id: str, within: float = 60.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            task = await self.task(task_id)
            return task if task["status"] in TERMINAL else None

        return await eventually(check, within=within)

    async def workers(self, state: str | None = None) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/workers")
        assert response.status_code == 200, response.text
        workers: list[dict[str, Any]] = response.json()["workers"]
        return [worker for worker in workers if state is None or worker["state"] == state]


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = 60.0) -> T:
    """Poll ``check`` until it answers something, with a deadline."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last: {result!r})")
        await asyncio.sleep(0.05)


def pool(
    models: list[dict[str, Any]] | None = None, *, min_workers: int = 1, max_workers: int = 2, **extra: Any
) -> dict[str, Any]:
    return {
        "name": "gpu",
        "provider": "process",
        "min_workers": min_workers,
        "max_workers": max_workers,
        "models": models or [],
        "models_allow_private": True,  # the file server is on loopback
        "startup_timeout_s": 60,
        "settings": {"command": EMULATOR_COMMAND},
        **extra,
    }


def service_settings(tmp_path: Path, pools: list[dict[str, Any]], **models: Any) -> dict[str, Any]:
    return {
        "store": f"sqlite:///{tmp_path / 'comfyfleet.db'}",
        "outputs": str(tmp_path / "outputs"),
        "host": "127.0.0.1",
        "port": 0,
        "pools": pools,
        "dispatch": {"retry_base_s": 0.05, "retry_max_s": 0.2, "lease_s": 5.0},
        "fleet": {
            "namespace": f"m{uuid.uuid4().hex[:10]}",
            "probe_interval_s": 0.2,
            "probe_timeout_s": 1.0,
            "failure_threshold": 2,
            "reconcile_interval_s": 0.2,
            "reap_interval_s": 1.0,
            "start_backoff_base_s": 0.2,
        },
        "models": {
            "cache_dir": str(tmp_path / "cache"),
            "workers_dir": str(tmp_path / "workers"),
            "fetch_retry_base_s": 0.0,
            **models,
        },
    }


@asynccontextmanager
async def service(settings: dict[str, Any]) -> AsyncIterator[Service]:
    async with Runtime(load_settings(**settings)) as runtime:
        running = asyncio.ensure_future(runtime.run())
        try:
            port = await runtime.wait_listening()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                yield Service(runtime, http)
        finally:
            runtime.request_stop()
            await running


class Serve:
    """``python -m comfyfleet serve --config …`` as a child process (so it can be killed with SIGKILL), its log
    in a file."""

    def __init__(self, workdir: Path, config: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "comfyfleet", "serve", "--config", str(config), "--port", "0"],
                cwd=workdir,
                env={key: value for key, value in os.environ.items() if not key.startswith("COMFYFLEET_")},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def url(self) -> str:
        async def listening() -> str | None:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            return match[1] if match else None

        return await eventually(listening, within=30.0)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """A clean stop (SIGTERM): the process workers it started are stopped with it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


_LISTENING = re.compile(r"api_listening url=(http://\S+)")
