"""The whole service (HTTP API, dispatcher, worker manager) scaling real workers: local processes and Docker
containers running the ComfyUI emulator."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_helpers import EMULATOR_COMMAND, docker_image

from comfyfleet.domain import WorkerState
from support import Fleet, eventually, running_fleet, tiny_workflow


def e2e_workflow(color: int) -> dict[str, Any]:
    """The tiny graph with a colour of its own, so no two tasks share ComfyUI's cached result."""
    return tiny_workflow(color, size=8, prefix="e2e")


async def submit(svc: Fleet, color: int) -> str:
    return str((await svc.submit(e2e_workflow(color)))["id"])


@asynccontextmanager
async def service(
    tmp_path: Path, namespace: str, pool: dict[str, Any], *, db: str = "comfyfleet.db"
) -> AsyncIterator[Fleet]:
    """comfyfleet with this one pool and no static worker; the test waits for the workers it expects."""
    async with running_fleet(
        tmp_path,
        workers=[],
        store=f"sqlite:///{tmp_path / db}",
        pools=[pool],
        fleet={"namespace": namespace, "reap_interval_s": 1.0},
    ) as svc:
        yield svc


async def all_completed(svc: Fleet, task_ids: list[str]) -> bool:
    tasks = await svc.tasks(task_ids)
    failed = [task for task in tasks if task["status"] in ("failed", "cancelled")]
    assert not failed, failed
    return all(task["status"] == "completed" for task in tasks)


def process_pool(tmp_path: Path, **policy: Any) -> dict[str, Any]:
    return {
        "name": "emu",
        "provider": "process",
        "prefetch": 1,
        "settings": {
            "command": [*EMULATOR_COMMAND, "--prompt-time", str(policy.pop("prompt_time_s", 0.2))],
            "log_dir": str(tmp_path / "logs"),
            "terminate_grace_s": 3,
        },
        **policy,
    }


@pytest.mark.slow
async def test_scale_from_zero_with_processes_runs_20_tasks_and_returns_to_zero(
    tmp_path: Path, namespace: str
) -> None:
    pool = process_pool(tmp_path, min_workers=0, max_workers=4, idle_timeout_s=1.0)
    async with service(tmp_path, namespace, pool) as svc:
        assert svc.manager.workers() == []
        task_ids = [await submit(svc, color) for color in range(20)]
        seen_workers: set[str] = set()
        most_at_once = 0

        async def done() -> bool:
            nonlocal most_at_once
            live = [w for w in svc.manager.workers() if w.state is not WorkerState.TERMINATED]
            most_at_once = max(most_at_once, len(live))
            seen_workers.update(w.id for w in live)
            return await all_completed(svc, task_ids)

        await eventually(done, what="all 20 tasks completed", within=60)
        tasks = await svc.tasks(task_ids)
        used = {task["worker_id"] for task in tasks}
        assert 1 < len(used) <= 4, used
        assert most_at_once <= 4, "never more than max_workers"
        assert used <= seen_workers
        await eventually(lambda: _no_workers(svc), what="the pool back to zero after idle_timeout", within=30)
        gone = await svc.runtime.store.list_workers(include_gone=True)
        assert all(worker.state is WorkerState.TERMINATED for worker in gone)
        assert all("idle for" in str(worker.info.get("stop_reason")) for worker in gone)


async def _no_workers(svc: Fleet) -> bool:
    return svc.manager.workers() == []


@pytest.mark.slow
async def test_killed_process_worker_its_task_completes_elsewhere_and_a_replacement_starts(
    tmp_path: Path, namespace: str
) -> None:
    pool = process_pool(
        tmp_path, min_workers=2, max_workers=2, idle_timeout_s=600, prompt_time_s=3.0, prefetch=0
    )
    async with service(tmp_path, namespace, pool) as svc:
        await eventually(lambda: _usable(svc, 2), what="two workers ready", within=60)
        task_id = await submit(svc, 1)

        async def executing() -> bool:
            (task,) = await svc.tasks([task_id])
            return task["status"] == "running" and task["phase"] == "executing"

        await eventually(executing, what="the task executes", within=60)
        (task,) = await svc.tasks([task_id])
        victim = next(w for w in svc.manager.workers() if w.id == task["worker_id"])
        killed_at = time.monotonic()
        os.kill(int(str(victim.provider_id).split("@")[0]), signal.SIGKILL)
        await eventually(
            lambda: _not_usable(svc, victim.id), what="the killed worker is withdrawn", within=10
        )
        assert time.monotonic() - killed_at < 0.2 * (2 + 2) + 1.0, (
            "within the health threshold (2 probes of 0.2 s)"
        )
        # The record follows the withdrawal through the registry's write-through (a moment later under load).
        await eventually(
            lambda: svc.runtime.store.get_worker(victim.id),
            until=lambda record: (
                record.state in (WorkerState.FAILED, WorkerState.TERMINATING, WorkerState.TERMINATED)
            ),
            what="the killed worker's record leaves busy",
            within=10,
        )

        await eventually(
            lambda: all_completed(svc, [task_id]), what="the task completes on the other worker", within=60
        )
        (task,) = await svc.tasks([task_id])
        assert task["worker_id"] != victim.id
        assert task["retry_count"] + len(task["attempts"]) >= 1
        await eventually(
            lambda: _usable(svc, 2, excluding=victim.id), what="a replacement keeps the floor of 2", within=60
        )


@pytest.mark.slow
async def test_a_worker_is_recycled_after_recycle_after_tasks(tmp_path: Path, namespace: str) -> None:
    pool = process_pool(
        tmp_path, min_workers=1, max_workers=1, idle_timeout_s=600, recycle_after_tasks=3, prompt_time_s=0.05
    )
    async with service(tmp_path, namespace, pool) as svc:
        await eventually(lambda: _usable(svc, 1), what="the first worker ready", within=60)
        task_ids = [await submit(svc, color) for color in range(7)]
        await eventually(lambda: all_completed(svc, task_ids), what="all 7 tasks completed", within=60)
        tasks = await svc.tasks(task_ids)
        per_worker: dict[str, int] = {}
        for task in tasks:
            per_worker[task["worker_id"]] = per_worker.get(task["worker_id"], 0) + 1
        # One worker at a time, each replaced once it was given 3 tasks (4 when two slots were handed over
        # in one go, with prefetch 1): 3 + 3 + 1 as a rule.
        assert len(per_worker) >= 2, per_worker
        assert all(n <= 4 for n in per_worker.values()), per_worker
        await eventually(lambda: _usable(svc, 1), what="a fresh worker keeps the floor of 1", within=60)
        records = {w.id: w for w in await svc.runtime.store.list_workers(include_gone=True)}

        async def recycled_ones_stopped() -> bool:
            records.update({w.id: w for w in await svc.runtime.store.list_workers(include_gone=True)})
            return sum(1 for w in records.values() if w.state is WorkerState.TERMINATED) >= 2

        await eventually(recycled_ones_stopped, what="the recycled workers are terminated", within=60)
        recycled = [w for w in records.values() if w.info.get("recycled_after_tasks")]
        assert sorted(w.id for w in recycled) == sorted(w for w, n in per_worker.items() if n >= 3)
        assert all(
            w.info["recycled_after_tasks"] in (3, 4) and w.info["stop_reason"] == "drained" for w in recycled
        )
        assert all(per_worker[w.id] == w.info["recycled_after_tasks"] for w in recycled)


async def _usable(svc: Fleet, count: int, excluding: str | None = None) -> bool:
    return len([w for w in svc.manager.usable_workers() if w.id != excluding]) == count


async def _not_usable(svc: Fleet, worker_id: str) -> bool:
    return worker_id not in {w.id for w in svc.manager.usable_workers()}


# -- docker -------------------------------------------------------------------------------------------------------


def containers(namespace: str) -> list[dict[str, Any]]:
    import docker

    client = docker.from_env()
    try:
        found: list[dict[str, Any]] = client.api.containers(
            all=True, filters={"label": ["comfyfleet.managed=true", f"comfyfleet.namespace={namespace}"]}
        )
        return found
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
async def test_docker_pool_runs_tasks_survives_a_restart_and_removes_idle_containers(
    tmp_path: Path, namespace: str
) -> None:
    image = docker_image()
    pool = {
        "name": "dock",
        "provider": "docker",
        "min_workers": 0,
        "max_workers": 2,
        "idle_timeout_s": 3.0,
        "prefetch": 1,
        "settings": {
            "image": image,
            "command": [
                "python",
                "-m",
                "comfyfleet",
                "emulator",
                "--host",
                "0.0.0.0",
                "--port",
                "8188",
                "--prompt-time",
                "0.5",
            ],
            "stop_timeout_s": 2,
        },
    }
    async with service(tmp_path, namespace, pool) as svc:
        first_batch = [await submit(svc, color) for color in range(6)]
        await eventually(lambda: _usable(svc, 2), what="two containers ready", within=60)
        created = {c["Id"] for c in containers(namespace)}
        assert len(created) == 2
        for container in containers(namespace):
            labels = container["Labels"]
            assert labels["comfyfleet.pool"] == "dock"
            assert labels["comfyfleet.worker-id"] in {w.id for w in svc.manager.workers()}
            assert labels["comfyfleet.installation"] == await svc.runtime.store.installation_id()
        # comfyfleet stops mid-run (tasks still pending or running); the containers stay up.
    assert {c["Id"] for c in containers(namespace)} == created
    async with service(tmp_path, namespace, pool) as svc:
        second_batch = [await submit(svc, color) for color in range(6, 10)]
        await eventually(
            lambda: all_completed(svc, first_batch + second_batch),
            what="every task completes after the restart",
            within=60,
        )
        assert {c["Id"] for c in containers(namespace)} <= created, (
            "the running containers were adopted, none duplicated"
        )
        tasks = await svc.tasks(first_batch + second_batch)
        workers_used = {t["worker_id"] for t in tasks}
        assert workers_used <= {c["Labels"]["comfyfleet.worker-id"] for c in containers(namespace)} | {None}
        await eventually(lambda: _no_containers(namespace), what="idle containers removed", within=30)
        await eventually(lambda: _no_workers(svc), what="their workers terminated", within=10)


async def _no_containers(namespace: str) -> bool:
    return containers(namespace) == []


@pytest.mark.docker
@pytest.mark.slow
async def test_docker_pool_after_kill_9_mid_run_adopts_its_containers_and_leaks_none(
    tmp_path: Path, namespace: str
) -> None:
    """``comfyfleet serve`` killed with SIGKILL while containers run tasks: the next start finds them by their
    labels, finishes every task on them without starting more, and removes them once idle."""
    import socket
    import subprocess
    import sys

    import yaml

    image = docker_image()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = {
        "store": f"sqlite:///{tmp_path / 'serve.db'}",
        "outputs": str(tmp_path / "outputs"),
        "pools": [
            {
                "name": "dock",
                "provider": "docker",
                "max_workers": 2,
                "idle_timeout_s": 2.0,
                "settings": {
                    "image": image,
                    "command": [
                        "python",
                        "-m",
                        "comfyfleet",
                        "emulator",
                        "--host",
                        "0.0.0.0",
                        "--port",
                        "8188",
                        "--prompt-time",
                        "0.4",
                    ],
                    "stop_timeout_s": 2,
                },
            }
        ],
        "dispatch": {"retry_base_s": 0.05, "retry_max_s": 0.2, "lease_s": 2.0},
        "fleet": {
            "namespace": namespace,
            "probe_interval_s": 0.2,
            "reconcile_interval_s": 0.2,
            "reap_interval_s": 1.0,
        },
    }
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "comfyfleet",
                    "serve",
                    "--config",
                    str(config_path),
                    "--port",
                    str(port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(http: httpx.AsyncClient) -> bool:
        try:
            return (await http.get(f"{url}/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    peak: set[str] = set()

    async def containers_seen() -> int:
        current = {c["Id"] for c in containers(namespace)}
        peak.update(current)
        return len(current)

    server = start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await eventually(lambda: ready(http), what="serve answers /ready", within=30)
            task_ids = []
            for color in range(8):
                response = await http.post(f"{url}/api/v1/tasks", json={"payload": e2e_workflow(color)})
                assert response.status_code == 201, response.text
                task_ids.append(response.json()["id"])

            async def some_done_some_not() -> bool:
                await containers_seen()
                statuses = [(await http.get(f"{url}/api/v1/tasks/{t}")).json()["status"] for t in task_ids]
                return "completed" in statuses and any(s != "completed" for s in statuses)

            await eventually(some_done_some_not, what="the containers run tasks", within=60)
            before = {c["Id"] for c in containers(namespace)}
            assert len(before) == 2
            server.send_signal(signal.SIGKILL)
            server.wait()
            assert {c["Id"] for c in containers(namespace)} == before, (
                "containers outlive a killed comfyfleet"
            )

            server = start()
            await eventually(lambda: ready(http), what="serve answers /ready again", within=30)

            async def all_done() -> bool:
                await containers_seen()
                statuses = [(await http.get(f"{url}/api/v1/tasks/{t}")).json()["status"] for t in task_ids]
                assert "failed" not in statuses
                return all(s == "completed" for s in statuses)

            await eventually(all_done, what="every task completes after the restart", within=60)
            assert peak == before, "no container was started twice or in addition"
            await eventually(
                lambda: _no_containers(namespace), what="idle containers removed, none leaked", within=30
            )
            workers = (await http.get(f"{url}/api/v1/workers")).json()
            assert workers["count"] == 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        for container in containers(namespace):  # only if the test failed half-way
            import docker

            client = docker.from_env()
            client.api.remove_container(container["Id"], force=True)
            client.close()
