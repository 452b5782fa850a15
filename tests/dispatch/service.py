"""A real comfyfleet service (runtime + HTTP on loopback) over in-process emulator workers, for dispatch tests."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from comfyfleet.config import load_settings
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.emulators.comfyui.server import EmulatorServer
from comfyfleet.runtime import Runtime

SEED_WORKFLOW: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "api" / "data" / "seed_task.json").read_text()
)

TERMINAL = {"completed", "failed", "cancelled"}


def seed_payload(seed: int = 46588125086418, *, steps: int = 20) -> dict[str, Any]:
    """The seed's example graph with another seed, so that no two tasks share a cached result."""
    graph = copy.deepcopy(SEED_WORKFLOW["payload"])
    graph["3"]["inputs"]["seed"] = seed
    graph["3"]["inputs"]["steps"] = steps
    return graph


def tiny_payload(color: int = 0, size: int = 16) -> dict[str, Any]:
    """EmptyImage → SaveImage: the cheapest graph that writes a file."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    }


@dataclass
class Service:
    runtime: Runtime
    http: httpx.AsyncClient
    url: str

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

    async def wait_task(
        self,
        task_id: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Poll until ``predicate(task)`` (default: the task ended) holds, or fail at the deadline."""
        check = predicate or (lambda task: task["status"] in TERMINAL)
        return await poll_until(
            lambda: self.task(task_id), check, timeout_s=timeout_s, what=f"task {task_id}"
        )


async def poll_until(
    read: Callable[[], Awaitable[Any]],
    check: Callable[[Any], bool],
    *,
    timeout_s: float,
    what: str,
    every_s: float = 0.02,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} did not reach the expected state in {timeout_s} s; last seen: {value!r}"[:2000]
            )
        await asyncio.sleep(every_s)


@asynccontextmanager
async def emulators(*options: EmulatorOptions) -> AsyncIterator[list[EmulatorServer]]:
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(EmulatorServer(option)) for option in options]
        for server in servers:
            await server.ready.wait()
        yield servers


def fast_settings(tmp_path: Path, workers: list[str], **overrides: Any) -> dict[str, Any]:
    dispatch = {
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "interrupt_grace_s": 1.0,
        "lease_s": 5.0,
        **overrides.pop("dispatch", {}),
    }
    fleet = {
        "probe_interval_s": 0.2,
        "probe_timeout_s": 1.0,
        "failure_threshold": 2,
        "reconcile_interval_s": 0.2,
        **overrides.pop("fleet", {}),
    }
    return {
        "store": overrides.pop("store", f"sqlite:///{tmp_path / 'comfyfleet.db'}"),
        "outputs": str(tmp_path / "outputs"),
        "host": "127.0.0.1",
        "port": 0,
        "workers": workers,
        "dispatch": dispatch,
        "fleet": fleet,
        **overrides,
    }


@asynccontextmanager
async def service(
    tmp_path: Path, workers: list[str], *, wait_workers: int | None = None, **overrides: Any
) -> AsyncIterator[Service]:
    """comfyfleet serving on a loopback port with these static workers; waits until they are usable."""
    settings = load_settings(**fast_settings(tmp_path, workers, **overrides))
    async with Runtime(settings) as runtime:
        running = asyncio.ensure_future(runtime.run())
        try:
            port = await runtime.wait_listening()
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
                svc = Service(runtime, http, url)
                expected = len(workers) if wait_workers is None else wait_workers
                if expected:
                    fleet = runtime.services.fleet
                    await poll_until(
                        lambda: asyncio.sleep(0, fleet.usable_workers()),
                        lambda usable: len(usable) >= expected,
                        timeout_s=15,
                        what="workers becoming usable",
                    )
                yield svc
        finally:
            runtime.request_stop()
            await running


class ServeProcess:
    """``comfyfleet serve`` as a child process (so it can be killed with SIGKILL), with its own config file."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], name: str = "serve") -> None:
        import yaml

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_path / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "comfyfleet",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, http: httpx.AsyncClient, *, timeout_s: float = 20.0) -> None:
        async def ready() -> int:
            try:
                return (await http.get(f"{self.url}/ready")).status_code
            except httpx.HTTPError:
                assert self.popen is not None
                assert self.popen.poll() is None, self.log_path.read_text()[-3000:]
                return 0

        await poll_until(ready, lambda status: status == 200, timeout_s=timeout_s, what=f"{self.url}/ready")

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def queue_metrics(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    metrics: dict[str, Any] = (await http.get(f"{url}/api/v1/queue/metrics")).json()
    return metrics


def serve_config(
    tmp_path: Path, workers: list[str], store: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "store": store or f"sqlite:///{tmp_path / 'comfyfleet.db'}",
        "outputs": str(tmp_path / "outputs"),
        "workers": workers,
        "dispatch": {"lease_s": 3.0, "retry_base_s": 0.05, "retry_max_s": 0.5},
        "fleet": {"probe_interval_s": 0.2, "reconcile_interval_s": 0.2},
        **extra,
    }


async def submit_all(
    http: httpx.AsyncClient, urls: list[str], count: int, *, concurrency: int = 16
) -> list[str]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(n: int) -> str:
        # A dropped keep-alive connection is retried with the same Idempotency-Key, as a careful client does:
        # the retry returns the task the first try created, if it did.
        headers = {"Idempotency-Key": f"submit-{n}"}
        async with semaphore:
            for remaining in range(2, -1, -1):
                try:
                    response = await http.post(
                        f"{urls[n % len(urls)]}/api/v1/tasks",
                        json={"payload": tiny_payload(color=n)},
                        headers=headers,
                    )
                    break
                except httpx.TransportError:
                    if not remaining:
                        raise
            assert response.status_code in {200, 201}, response.text
            return str(response.json()["id"])

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def read_tasks(http: httpx.AsyncClient, url: str, ids: list[str]) -> list[dict[str, Any]]:
    tasks = []
    for task_id in ids:
        response = await http.get(f"{url}/api/v1/tasks/{task_id}")
        assert response.status_code == 200
        tasks.append(response.json())
    return tasks


def executions(workers: list[EmulatorServer]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for worker in workers:
        counts.update(worker.stats.executions)
    return counts
