"""The API behaves the same over SQLite and PostgreSQL (the shared ``store`` fixture runs each test on both)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from api_helpers import API_KEYS, SEED_TASK_FIELDS, assert_error_shape, bearer, small_body

from comfyfleet.config import Settings
from comfyfleet.runtime import create_app
from comfyfleet.store import Lease, Store, open_store
from support import FleetThread, eventually, seed_body


@pytest.fixture
async def http(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(store=store.url, api_keys=API_KEYS), store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://comfyfleet.test"
    ) as client:
        yield client


async def test_submit_read_list_cancel(http: httpx.AsyncClient, store: Store) -> None:
    created = await http.post("/api/v1/tasks", json=seed_body(), headers=bearer("alice"))
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["status"] == "pending"
    assert task["created_at"].endswith("Z")

    fetched = (await http.get(f"/api/v1/tasks/{task['id']}", headers=bearer("alice"))).json()
    assert all(field in fetched for field in SEED_TASK_FIELDS)
    assert fetched["payload"] == seed_body()["payload"]
    assert fetched["queue_position"] == 1
    assert fetched["created_at"] == task["created_at"]

    replay = await http.post(
        "/api/v1/tasks", json=small_body(), headers={**bearer("alice"), "Idempotency-Key": "k1"}
    )
    again = await http.post(
        "/api/v1/tasks", json=small_body(), headers={**bearer("alice"), "Idempotency-Key": "k1"}
    )
    assert (replay.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == replay.json()["id"]

    listed = (
        await http.get("/api/v1/tasks", params={"status": "pending", "limit": 1}, headers=bearer("alice"))
    ).json()
    assert [entry["id"] for entry in listed["tasks"]] == [replay.json()["id"]]
    assert listed["next_cursor"] is not None
    rest = (
        await http.get(
            "/api/v1/tasks",
            params={"status": "pending", "cursor": listed["next_cursor"]},
            headers=bearer("alice"),
        )
    ).json()
    assert [entry["id"] for entry in rest["tasks"]] == [task["id"]]
    assert rest["next_cursor"] is None

    assert_error_shape(await http.get(f"/api/v1/tasks/{task['id']}", headers=bearer("bob")), 404, "not_found")
    assert (await http.get("/api/v1/tasks", headers=bearer("bob"))).json()["tasks"] == []

    [claimed] = await store.claim_ids(
        "test-dispatcher", 30.0, [head.id for head in await store.peek_pending(limit=1)]
    )
    assert claimed.id == task["id"]  # priority 5 before the priority-0 task
    running = await http.delete(f"/api/v1/tasks/{task['id']}", headers=bearer("alice"))
    assert running.status_code == 202
    assert running.json()["cancel_requested"] is True
    await store.finish_cancelled(Lease(claimed.id, claimed.attempt, "test-dispatcher"))
    assert_error_shape(
        await http.delete(f"/api/v1/tasks/{task['id']}", headers=bearer("alice")), 409, "conflict"
    )
    pending = await http.delete(f"/api/v1/tasks/{replay.json()['id']}", headers=bearer("ops"))
    assert pending.status_code == 200
    assert pending.json()["status"] == "cancelled"

    metrics = (await http.get("/api/v1/queue/metrics", headers=bearer("alice"))).json()
    assert metrics["cancelled_tasks"] == 2
    assert metrics["pending_tasks"] == 0
    assert metrics["oldest_pending_age_s"] is None


@pytest.mark.postgres
def test_a_real_server_migrates_and_serves_on_postgresql(tmp_path: Path, empty_postgres_url: str) -> None:
    with FleetThread(tmp_path, workers=0, store=empty_postgres_url) as server:
        assert httpx.get(f"{server.url}/ready", timeout=10).json() == {"status": "ready"}
        created = httpx.post(f"{server.url}/api/v1/tasks", json=seed_body(), timeout=10)
        assert created.status_code == 201
        fetched = httpx.get(f"{server.url}/api/v1/tasks/{created.json()['id']}", timeout=10).json()
        assert fetched["status"] == "pending"
        assert fetched["queue_position"] == 1


@pytest.mark.postgres
async def test_a_postgresql_outage_is_503_and_the_api_recovers(
    postgres_url: str, postgres_admin_url: str
) -> None:
    database = urlsplit(postgres_url).path.lstrip("/")
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        async with open_store(postgres_url, max_connections=2) as store:
            app = create_app(Settings(store=postgres_url), store)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://comfyfleet.test") as client:
                assert (await client.post("/api/v1/tasks", json=small_body())).status_code == 201
                # The database goes away: no new connections, and the open ones are cut.
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
                )
                outage_codes = {"store_unavailable"}
                response = await client.post("/api/v1/tasks", json=small_body())
                assert assert_error_shape(response, 503)["error"] in outage_codes
                assert response.headers["retry-after"] == "1"
                assert assert_error_shape(await client.get("/api/v1/tasks"), 503)["error"] in outage_codes
                assert_error_shape(await client.get("/ready"), 503, "not_ready")
                assert (await client.get("/health")).status_code == 200

                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                await eventually(
                    lambda: client.post("/api/v1/tasks", json=small_body()),
                    until=lambda response: response.status_code == 201,
                    what="a submission after the outage",
                )
                listed = (await client.get("/api/v1/tasks")).json()
                assert listed["count"] == 2
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
