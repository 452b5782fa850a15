"""``comfyfleet serve`` and ``comfyfleet migrate`` as real processes: start-up, warnings, graceful stop,
and durability across ``kill -9``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import ServeProcess, clean_env, seed_body


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(*args: str, name: str = "serve") -> ServeProcess:
        process = ServeProcess(tmp_path, *args, name=name).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comfyfleet", *args],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_applies_then_reports_up_to_date(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'fleet.db'}"
    first = run_cli(tmp_path, "migrate", "--store", store)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied migrations: 1")
    again = run_cli(tmp_path, "migrate", "--store", store)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "store is up to date"


def test_serve_refuses_an_unknown_store_url_clearly(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--port", "0", "--store", "mysql://somewhere/db")
    assert result.returncode == 1
    assert "error: cannot open the store mysql://somewhere/db" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_refuses_a_port_in_use_clearly(tmp_path: Path, serve_process: Any) -> None:
    first = serve_process("--store", f"sqlite:///{tmp_path / 'a.db'}", name="first")
    port = first.wait_listening().rsplit(":", 1)[1]
    result = run_cli(tmp_path, "serve", "--port", port, "--store", f"sqlite:///{tmp_path / 'b.db'}")
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_warns_loudly_without_keys_off_loopback_and_stops_gracefully(
    tmp_path: Path, serve_process: Any
) -> None:
    server = serve_process("--host", "0.0.0.0", "--store", f"sqlite:///{tmp_path / 'open.db'}")
    url = server.wait_listening()
    assert httpx.get(f"{url}/ready", timeout=10).json() == {"status": "ready"}
    assert server.stop(signal.SIGTERM) == 0
    log = server.log
    assert "api_unprotected" in log
    assert "NO API KEYS" in log
    assert "running_without_workers" in log
    assert "api_stopped" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_serve_on_loopback_with_keys_does_not_warn(tmp_path: Path, serve_process: Any) -> None:
    config = tmp_path / "comfyfleet.yaml"
    config.write_text("store: sqlite:///keyed.db\napi_keys:\n  - key: k-123\n    tenant: team\n")
    server = serve_process("--config", str(config))
    url = server.wait_listening()
    response = httpx.post(
        f"{url}/api/v1/tasks", json=seed_body(), headers={"Authorization": "Bearer k-123"}, timeout=10
    )
    assert response.status_code == 201
    assert response.json()["tenant"] == "team"
    assert httpx.get(f"{url}/api/v1/tasks", timeout=10).status_code == 401
    assert server.stop(signal.SIGINT) == 0
    assert "api_unprotected" not in server.log
    assert (tmp_path / "keyed.db").exists()  # relative to the config file


@pytest.mark.slow
async def test_kill_9_during_a_burst_loses_no_acknowledged_task(tmp_path: Path, serve_process: Any) -> None:
    store = f"sqlite:///{tmp_path / 'durable.db'}"
    server = serve_process("--store", store, name="before-kill")
    url = server.wait_listening()

    acknowledged: dict[str, dict[str, Any]] = {}  # idempotency key -> the 201 body
    unanswered: dict[str, dict[str, Any]] = {}  # idempotency key -> body whose POST got no answer
    enough = asyncio.Event()
    kill_after = 300

    async def submitter(client: httpx.AsyncClient, worker: int) -> None:
        sequence = 0
        while True:
            sequence += 1
            key = f"w{worker}-{sequence}"
            body = seed_body()
            body["priority"] = (worker * 7 + sequence) % 11 - 5
            body["workflow_id"] = key
            try:
                response = await client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                unanswered[key] = body
                return
            assert response.status_code == 201, response.text
            acknowledged[key] = response.json()
            if len(acknowledged) >= kill_after:
                enough.set()

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with (
        httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client,
        asyncio.TaskGroup() as group,
    ):
        for worker in range(16):
            group.create_task(submitter(client, worker), name=f"submitter-{worker}")
        await asyncio.wait_for(enough.wait(), timeout=60)
        server.kill()  # SIGKILL: no shutdown code runs
    assert server.process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= kill_after

    restarted = serve_process("--store", store, name="after-kill")
    url = restarted.wait_listening()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for key, created in acknowledged.items():
            response = await client.get(f"/api/v1/tasks/{created['id']}")
            assert response.status_code == 200, (key, response.text)
            stored = response.json()
            assert stored.pop("queue_position") >= 1
            assert created.pop("queue_position") is None
            assert stored == created, key
        # A request whose answer was lost is safe to retry with its key: it never makes a second task.
        for key, body in unanswered.items():
            retry = await client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
            assert retry.status_code in (200, 201), retry.text
        stored_keys = await all_workflow_ids(client)
    assert len(stored_keys) == len(set(stored_keys))
    assert set(stored_keys) == set(acknowledged) | set(unanswered)
    assert restarted.stop() == 0


async def all_workflow_ids(client: httpx.AsyncClient) -> list[str]:
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = (
            await client.get("/api/v1/tasks", params={"limit": 500, **({"cursor": cursor} if cursor else {})})
        ).json()
        found += [task["workflow_id"] for task in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return found
