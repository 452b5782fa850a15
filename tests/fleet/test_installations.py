"""Two installations on one host: the same config (same pool names, the default namespace) but separate stores,
run as real ``comfyfleet serve`` processes side by side. Each keeps its own workers through several reaper
cycles and runs its tasks; a worker process killed from outside is logged by the installation that owns it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fleet_helpers import DEADLINE_S, EMULATOR_COMMAND

from support import ServeProcess, eventually

STARTUP_S = 60.0


def tiny_payload(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "iso"}},
    }


@dataclass
class Installation:
    """``comfyfleet serve`` in a directory of its own (its store, outputs and worker logs)."""

    name: str
    home: Path
    server: ServeProcess
    worker_pids: dict[str, int] = field(default_factory=dict)  # worker id -> pid, once its workers are up

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.server.process

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log(self) -> str:
        return self.server.log

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def count(self, event: str) -> int:
        return self.log.count(event)

    async def listening(self) -> None:
        await asyncio.to_thread(self.server.wait_listening, STARTUP_S)

    async def workers(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            response = await http.get("/api/v1/workers")
        assert response.status_code == 200, response.text
        workers: list[dict[str, Any]] = response.json()["workers"]
        return workers


def start(home: Path, config: Path, name: str) -> Installation:
    home.mkdir()
    args = ("--log-level", "debug", "--config", str(config), "--store", f"sqlite:///{home / 'comfyfleet.db'}")
    return Installation(name, home, ServeProcess(home, *args).start())


@contextlib.asynccontextmanager
async def side_by_side(tmp_path: Path, config: Path) -> AsyncIterator[list[Installation]]:
    started: list[Installation] = []
    try:
        yield started
    finally:
        for installation in started:
            if installation.process.poll() is None:
                installation.process.send_signal(signal.SIGTERM)
        for installation in started:
            try:
                await asyncio.to_thread(installation.process.wait, STARTUP_S)
            except subprocess.TimeoutExpired:
                installation.process.kill()
            # A worker left behind by a serve that did not stop cleanly must not outlive the test.
            for pid in installation.worker_pids.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def pid_of(worker: dict[str, Any]) -> int:
    return int(str(worker["provider_id"]).split("@")[0])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def ready_workers(installation: Installation, count: int, watching: list[Installation]) -> None:
    async def check() -> bool:
        assert_keeps_its_workers(watching)  # fails at once, not at the deadline, if a worker is killed
        workers = [w for w in await installation.workers() if w["state"] in ("idle", "busy")]
        if len(workers) != count:
            return False
        installation.worker_pids = {w["id"]: pid_of(w) for w in workers}
        return True

    await eventually(check, what=f"{installation.name}: {count} workers ready", within=STARTUP_S)


def assert_keeps_its_workers(installations: list[Installation]) -> None:
    for installation in installations:
        for worker_id, pid in installation.worker_pids.items():
            assert alive(pid), (
                f"{installation.name} lost worker {worker_id} (pid {pid}):\n{installation.tail()}"
            )
        assert "worker_reaped" not in installation.log, installation.tail()


@pytest.mark.slow
async def test_two_installations_with_the_same_config_keep_their_own_workers(tmp_path: Path) -> None:
    pool = f"emu{uuid.uuid4().hex[:6]}"  # the same in both; of this test only, in the default namespace
    config = tmp_path / "comfyfleet.yaml"
    settings = {
        "pools": [
            {
                "name": pool,
                "provider": "process",
                "min_workers": 2,
                "max_workers": 2,
                "idle_timeout_s": 600,
                "settings": {"command": [*EMULATOR_COMMAND, "--prompt-time", "0.1"], "terminate_grace_s": 3},
            }
        ],
        "fleet": {"reap_interval_s": 0.3, "reconcile_interval_s": 0.1, "probe_interval_s": 0.5},
    }
    config.write_text(json.dumps(settings))  # JSON is YAML
    async with side_by_side(tmp_path, config) as started:
        first = start(tmp_path / "first", config, "first")
        started.append(first)
        await first.listening()
        await ready_workers(first, 2, [])

        second = start(tmp_path / "second", config, "second")
        started.append(second)
        await second.listening()
        first_before = first.count("fleet_reap_pass")

        await ready_workers(second, 2, [first])
        second_before = 0

        async def both_reaped_twice() -> bool:
            assert_keeps_its_workers(started)
            return (
                second.count("fleet_reap_pass") >= second_before + 2
                and first.count("fleet_reap_pass") >= first_before + 2
            )

        await eventually(both_reaped_twice, what="two reaper cycles of each installation", within=STARTUP_S)
        assert set(first.worker_pids).isdisjoint(second.worker_pids)

        await asyncio.gather(*(run_tasks(installation, 4) for installation in started))
        first_before, second_before = first.count("fleet_reap_pass"), second.count("fleet_reap_pass")
        await eventually(both_reaped_twice, what="two more reaper cycles", within=STARTUP_S)
        assert_keeps_its_workers(started)

        # A worker process killed from outside: its own installation says so, with the signal.
        victim_id, victim_pid = sorted(first.worker_pids.items())[0]
        first.worker_pids.pop(victim_id)
        os.kill(victim_pid, signal.SIGKILL)
        line = re.compile(
            rf"WARNING .*worker_process_killed worker_id={victim_id} pid={victim_pid} signal=SIGKILL"
        )

        async def logged() -> bool:
            return bool(line.search(first.log))

        await eventually(logged, what="the first installation logs the killed worker", within=DEADLINE_S)
        assert "worker_process_killed" not in second.log
        assert_keeps_its_workers([second])


async def run_tasks(installation: Installation, count: int) -> None:
    async with httpx.AsyncClient(base_url=installation.url, timeout=30) as http:
        ids = []
        for color in range(count):
            response = await http.post("/api/v1/tasks", json={"payload": tiny_payload(color)})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])

        async def completed() -> bool:
            tasks = [(await http.get(f"/api/v1/tasks/{task_id}")).json() for task_id in ids]
            assert all(task["status"] not in ("failed", "cancelled") for task in tasks), tasks
            done = [task for task in tasks if task["status"] == "completed"]
            # Run by the workers it started, on the first attempt: none was lost to the other installation.
            assert all(task["worker_id"] in installation.worker_pids for task in done), done
            assert all(task["retry_count"] == 0 for task in done), done
            return len(done) == count

        await eventually(completed, what=f"{installation.name}: {count} tasks completed", within=STARTUP_S)
