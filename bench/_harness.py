"""Shared pieces of the benchmarks: emulator and service subprocesses on loopback, the whole service in-process,
graphs, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from comfyfleet.config import load_settings
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.runtime import Runtime

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.05)


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextlib.contextmanager
def emulator_processes(count: int, *args: str) -> Iterator[list[Process]]:
    """``count`` ComfyUI emulators, each its own process, like real workers."""
    processes = []
    try:
        for _ in range(count):
            port = free_port()
            popen = subprocess.Popen(
                [PYTHON, "-m", "comfyfleet", "emulator", "--port", str(port), *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(Process(popen, f"http://127.0.0.1:{port}"))
        for process in processes:
            wait_http(process.url + "/system_stats")
        yield processes
    finally:
        for process in processes:
            process.stop()


@contextlib.contextmanager
def service_process(
    config: dict[str, Any], *, expect_workers: int, python: str = PYTHON
) -> Iterator[Process]:
    """``comfyfleet serve`` with this config (a temporary SQLite store unless the config names one), run by
    ``python`` (another checkout's interpreter measures that version side by side)."""
    with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-") as workdir:
        port = free_port()
        config = {"store": f"sqlite:///{workdir}/bench.db", "outputs": f"{workdir}/outputs", **config}
        config_path = Path(workdir) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log = (Path(workdir) / "serve.log").open("wb")
        popen = subprocess.Popen(
            [
                python,
                "-m",
                "comfyfleet",
                "serve",
                "--config",
                str(config_path),
                "--port",
                str(port),
                "--log-level",
                "info",  # the default: what a user's service pays for logging
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COMFYFLEET_CONFIG": ""},
        )
        process = Process(popen, f"http://127.0.0.1:{port}")
        try:
            wait_http(process.url + "/ready")
            _wait_workers_serving(process.url, expect_workers)
            yield process
        finally:
            process.stop()
            log.close()


def _wait_workers_serving(url: str, expected: int, timeout_s: float = 30.0) -> None:
    """Until ``expected`` distinct workers have each completed a warm-up task (they are all usable)."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    variant = 10_000_000
    with httpx.Client(base_url=url, timeout=30) as client:
        while len(seen) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)} of {expected} workers became usable")
            ids = []
            for _ in range(expected):
                variant += 1
                # Big enough to take a while (the PNG's encoding), so all of them run at once, one per worker.
                payload = tiny_graph(variant, size=1024)
                ids.append(client.post("/api/v1/tasks", json={"payload": payload}).json()["id"])
            for task_id in ids:
                while True:
                    task = client.get(f"/api/v1/tasks/{task_id}").json()
                    if task["status"] in {"completed", "failed", "cancelled"}:
                        break
                    time.sleep(0.02)
                if task["status"] == "completed":
                    seen.add(task["worker_id"])


@contextlib.asynccontextmanager
async def in_process_service(
    folder: Path, pool: dict[str, Any], namespace: str, **settings_: Any
) -> AsyncIterator[tuple[FleetManager, httpx.AsyncClient]]:
    """The whole service (SQLite store in ``folder``, HTTP API, dispatcher, worker manager) with one ``pool``,
    in this process: its worker manager and an HTTP client on its API. ``settings_`` adds settings (``models``…)."""
    settings = load_settings(
        store=f"sqlite:///{folder / 'bench.db'}",
        outputs=str(folder / "outputs"),
        host="127.0.0.1",
        port=0,
        pools=[pool],
        fleet={"namespace": namespace, "probe_interval_s": 1.0, "reconcile_interval_s": 0.5},
        **settings_,
    )
    async with Runtime(settings) as runtime:
        serving = asyncio.ensure_future(runtime.run())
        try:
            port = await runtime.wait_listening()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                yield runtime.services.fleet, http
        finally:
            runtime.request_stop()
            await serving


async def wait_all(http: httpx.AsyncClient, task_ids: list[str], deadline: float) -> list[dict[str, Any]]:
    pending = set(task_ids)
    final: dict[str, dict[str, Any]] = {}
    while pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} tasks did not finish in time")
        for task_id in list(pending):
            task = (await http.get(f"/api/v1/tasks/{task_id}")).json()
            if task["status"] in ("completed", "failed", "cancelled"):
                final[task_id] = task
                pending.discard(task_id)
        await asyncio.sleep(0.1)
    return [final[task_id] for task_id in task_ids]


def tiny_graph(variant: int, size: int = 16) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": variant % 16777216},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }


def checkpoint_graph(variant: int, checkpoint: str) -> dict[str, Any]:
    """A small text-to-image graph that loads ``checkpoint`` (the emulator charges the model load)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a bottle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "text"}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "cfg": 8,
                "denoise": 1,
                "latent_image": ["5", 0],
                "model": ["4", 0],
                "negative": ["7", 0],
                "positive": ["6", 0],
                "sampler_name": "euler",
                "scheduler": "normal",
                "seed": variant,
                "steps": 1,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: Sequence[float]) -> str:
    ms = [value * 1000 for value in values]
    return f"p50 {percentile(ms, 50):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms   mean {statistics.fmean(ms):7.2f} ms   (n={len(ms)})"
