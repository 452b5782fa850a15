"""Helpers for the usage tests: a whole comfyfleet (runtime + API + dispatcher + fleet) in the test's
event loop, in front of real ComfyUI emulators on loopback. (A uniquely named module: test folders are
not packages.)"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from comfyfleet.config import Settings
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.runtime import Runtime

DATA = Path(__file__).parent / "data"
SEED_WORKFLOW: dict[str, Any] = json.loads((DATA / "seed_workflow.json").read_text())

T = TypeVar("T")


def seed_workflow(**changes: Any) -> dict[str, Any]:
    """The seed's example graph (KSampler … SaveImage, 512x512); ``changes`` patch KSampler's inputs."""
    graph = copy.deepcopy(SEED_WORKFLOW)
    graph["3"]["inputs"].update(changes)
    return graph


def tiny_workflow(color: int = 0x3366CC, size: int = 32, prefix: str = "tiny") -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 10.0, interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns something other than None/False, with a deadline."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last: {result!r})")
        await asyncio.sleep(interval)


@dataclass
class Fleet:
    url: str
    runtime: Runtime
    emulators: list[EmulatorServer]
    settings: Settings
    http: httpx.AsyncClient = field(repr=False)

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")


@asynccontextmanager
async def running_fleet(
    tmp_path: Path,
    *,
    workers: int = 2,
    emulator: dict[str, Any] | list[dict[str, Any]] | None = None,
    wait_for_workers: bool = True,
    **settings: Any,
) -> AsyncIterator[Fleet]:
    """comfyfleet serving on a free loopback port with ``workers`` emulators as its static workers (``emulator``:
    their options, or a list of options, one per worker)."""
    async with AsyncExitStack() as stack:
        emulators = []
        for index in range(workers):
            own = emulator[index] if isinstance(emulator, list) else emulator
            options = EmulatorOptions(base_dir=str(tmp_path / f"emulator-{index}"), **(own or {}))
            server = await stack.enter_async_context(EmulatorServer(options))
            await server.wait_ready()
            emulators.append(server)
        settings.setdefault("store", f"sqlite:///{tmp_path / 'comfyfleet.db'}")
        settings.setdefault("outputs", str(tmp_path / "outputs"))
        settings.setdefault("fleet", {"probe_interval_s": 0.5, "reconcile_interval_s": 0.2})
        settings.setdefault("dispatch", {"safety_poll_s": 0.5, "retry_base_s": 0.05, "retry_max_s": 0.2})
        config = Settings(host="127.0.0.1", port=0, workers=[server.url for server in emulators], **settings)
        runtime = await stack.enter_async_context(Runtime(config))
        serving = asyncio.create_task(runtime.run(), name="comfyfleet-under-test")
        try:
            port = await asyncio.wait_for(runtime.wait_listening(), 10)
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                fleet = Fleet(url, runtime, emulators, config, http)
                if wait_for_workers and workers:
                    await wait_workers(fleet, workers)
                yield fleet
        finally:
            runtime.request_stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(serving, 15)


async def wait_workers(fleet: Fleet, count: int, within: float = 10.0) -> list[Any]:
    """Until the worker manager has ``count`` health-probed workers."""
    manager = fleet.runtime.services.fleet

    async def ready() -> list[Any] | None:
        live = list(manager.usable_workers())
        return live if len(live) >= count else None

    return await eventually(ready, within=within)


async def wait_task(fleet: Fleet, task_id: str, within: float = 15.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        task: dict[str, Any] = (await fleet.http.get(f"/api/v1/tasks/{task_id}")).json()
        return task if task["status"] in ("completed", "failed", "cancelled") else None

    return await eventually(done, within=within)


NO_CLIENT_CONFIG = {"COMFYFLEET_CLIENT_CONFIG": "/nonexistent/comfyfleet-client.yaml"}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The ``comfyfleet`` command run in this process (in a thread, so the server in this event loop keeps
    going): much faster than a subprocess for the many small checks."""
    from typer.testing import CliRunner

    from comfyfleet.cli import app

    def invoke() -> tuple[int, str, str]:
        result = CliRunner().invoke(
            app,
            list(args),
            env={"COMFYFLEET_URL": None, "COMFYFLEET_API_KEY": None, **NO_CLIENT_CONFIG, **(env or {})},
        )  # type: ignore[dict-item]
        return result.exit_code, result.stdout, result.stderr

    return await asyncio.to_thread(invoke)


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path
