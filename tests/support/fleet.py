"""comfyfleet in the test's own process: the whole runtime (store, API, dispatcher, fleet) on a free loopback
port, in front of ComfyUI emulators (started here, or any worker URLs the test brings).

``running_fleet`` serves in the test's event loop, so a test can look inside (``fleet.runtime``, the emulators'
``stats``). ``FleetThread`` hosts the same thing in a thread of its own, for a synchronous test or a server
that outlives the event loops of the tests sharing it (a module-scoped fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from comfyfleet.config import Settings, load_settings
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.runtime import Runtime
from support.polling import eventually

TERMINAL = frozenset({"completed", "failed", "cancelled"})
# A ``process`` pool's command: one ComfyUI emulator per worker, on the address the provider gives it.
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
]

# Quick to notice a worker come or go, quick to retry: the tests wait on these, never on the defaults.
FAST_DISPATCH = {
    "retry_base_s": 0.05,
    "retry_max_s": 0.2,
    "interrupt_grace_s": 1.0,
    "lease_s": 5.0,
    "safety_poll_s": 0.5,
}
FAST_FLEET = {
    "probe_interval_s": 0.2,
    "probe_timeout_s": 1.0,
    "failure_threshold": 2,
    "reconcile_interval_s": 0.2,
}


def fast_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Settings for a test server under ``tmp_path``; ``dispatch`` and ``fleet`` overrides are merged into
    the fast defaults, anything else replaces its default."""
    return {
        "store": f"sqlite:///{tmp_path / 'comfyfleet.db'}",
        "outputs": str(tmp_path / "outputs"),
        "host": "127.0.0.1",
        "port": 0,
        **overrides,
        "dispatch": {**FAST_DISPATCH, **overrides.get("dispatch", {})},
        "fleet": {**FAST_FLEET, **overrides.get("fleet", {})},
    }


@dataclass
class Fleet:
    """A running comfyfleet: its URL, its runtime, the emulators it started, and a client on it."""

    url: str
    runtime: Runtime
    emulators: list[EmulatorServer]
    settings: Settings
    http: httpx.AsyncClient = field(repr=False)

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def manager(self) -> FleetManager:
        manager: FleetManager = self.runtime.services.fleet
        return manager

    async def submit(self, payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
        response = await self.http.post("/api/v1/tasks", json={"payload": payload, **fields})
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    async def tasks(self, task_ids: list[str]) -> list[dict[str, Any]]:
        return [await self.task(task_id) for task_id in task_ids]

    async def wait_task(
        self,
        task_id: str,
        until: Callable[[dict[str, Any]], bool] | None = None,
        *,
        within: float = 30.0,
    ) -> dict[str, Any]:
        """The task once ``until(task)`` holds (by default: once it has ended)."""
        task: dict[str, Any] = await eventually(
            lambda: self.task(task_id),
            until=until or (lambda task: task["status"] in TERMINAL),
            within=within,
            what=f"task {task_id}",
        )
        return task

    async def wait_workers(self, count: int, *, within: float = 15.0) -> list[Any]:
        """The usable workers, once there are at least ``count`` of them."""
        workers: list[Any] = await eventually(
            lambda: list(self.manager.usable_workers()),
            until=lambda usable: len(usable) >= count,
            within=within,
            what=f"{count} usable workers",
        )
        return workers


@asynccontextmanager
async def emulators(*options: EmulatorOptions) -> AsyncIterator[list[EmulatorServer]]:
    """ComfyUI emulators on loopback, each with its options, ready to take prompts."""
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(EmulatorServer(option)) for option in options]
        for server in servers:
            await server.wait_ready()
        yield servers


def _emulator_options(tmp_path: Path, count: int, emulator: Any) -> list[EmulatorOptions]:
    """Options for ``count`` emulators: ``emulator`` for each of them, or a list with one per emulator."""
    chosen = emulator if isinstance(emulator, list) else [emulator] * count
    return [
        EmulatorOptions(base_dir=str(tmp_path / f"emulator-{index}"), **(own or {}))
        for index, own in enumerate(chosen[:count])
    ]


@asynccontextmanager
async def running_fleet(
    tmp_path: Path,
    *,
    workers: int | list[str] = 2,
    emulator: dict[str, Any] | list[dict[str, Any]] | None = None,
    wait_workers: int | None = None,
    **settings: Any,
) -> AsyncIterator[Fleet]:
    """comfyfleet serving on a free loopback port. ``workers``: how many emulators to start as its static
    workers (``emulator``: their options, or a list of options, one per worker), or the URLs of workers the
    test started itself. Waits until ``wait_workers`` of them (default: all) are usable; 0 does not wait."""
    started = _emulator_options(tmp_path, workers, emulator) if isinstance(workers, int) else []
    async with emulators(*started) as servers:
        urls = [server.url for server in servers] if isinstance(workers, int) else workers
        config = load_settings(**fast_settings(tmp_path, workers=urls, **settings))
        async with Runtime(config) as runtime:
            serving = asyncio.create_task(runtime.run(), name="comfyfleet-under-test")
            try:
                port = await asyncio.wait_for(runtime.wait_listening(), 30)
                url = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    fleet = Fleet(url, runtime, servers, config, http)
                    expected = len(urls) if wait_workers is None else wait_workers
                    if expected:
                        await fleet.wait_workers(expected)
                    yield fleet
            finally:
                runtime.request_stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(serving, 15)


class FleetThread:
    """``running_fleet`` in a thread and event loop of its own: ``with FleetThread(tmp_path, …) as server``
    gives ``server.url`` to synchronous tests and to module-scoped fixtures (whose server must outlive the
    event loop of each test using it)."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.url = ""
        self._tmp_path = tmp_path
        self._options = options
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="comfyfleet-test-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_fleet(self._tmp_path, **self._options) as fleet:
            self.url = fleet.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> FleetThread:
        self._thread.start()
        if not self._ready.wait(timeout=60) or self._error is not None:
            raise RuntimeError(f"the test server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the test server did not stop"
        if self._error is not None:
            raise self._error
