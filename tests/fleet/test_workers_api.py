"""``/api/v1/workers`` over a running worker manager: a static URL and a Novita pool (its API emulator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fleet_helpers import novita_pool_settings

from comfyfleet.config import Settings
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.novita import NovitaEmulator
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.runtime import create_app
from comfyfleet.store import Store
from support import eventually

SEED_WORKER_FIELDS = {
    "id",
    "pod_name",
    "status",
    "endpoint",
    "port",
    "current_task_id",
    "created_at",
    "last_active_at",
    "health_status",
}
ADMIN_KEY = "admin-key-for-tests"
TENANT_KEY = "tenant-key-for-tests"


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "code", "message", "details"}
    assert body["code"] == status
    assert body["error"] == error
    assert body["message"]


@pytest.fixture
async def api(
    sqlite_store: Store, namespace: str, novita: NovitaEmulator
) -> AsyncIterator[tuple[httpx.AsyncClient, FleetManager]]:
    async with EmulatorServer(EmulatorOptions()) as comfy:
        settings = Settings(
            workers=[comfy.url],
            pools=[
                {
                    "name": "cloud",
                    "provider": "novita",
                    "min_workers": 1,
                    "max_workers": 1,
                    "idle_timeout_s": 600,
                    "settings": novita_pool_settings(novita),
                }
            ],
            fleet={"namespace": namespace, "probe_interval_s": 0.2, "reconcile_interval_s": 0.1},
            api_keys=[{"key": ADMIN_KEY, "admin": True}, {"key": TENANT_KEY, "tenant": "acme"}],
        )
        async with FleetManager(settings, sqlite_store) as fleet, asyncio.TaskGroup() as tg:
            tg.create_task(fleet.run())
            app = create_app(settings, sqlite_store, fleet=fleet)
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", headers=headers
            ) as client:
                await eventually(lambda: _ready(fleet, 2), what="both workers ready")
                try:
                    yield client, fleet
                finally:
                    fleet.stop()


async def _ready(fleet: FleetManager, count: int) -> bool:
    return len(fleet.usable_workers()) == count


async def test_list_get_and_metrics(api: tuple[httpx.AsyncClient, FleetManager]) -> None:
    client, fleet = api
    response = await client.get("/api/v1/workers")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 2
    by_pool = {worker["pool"]: worker for worker in body["workers"]}
    assert set(by_pool) == {"default", "cloud"}
    for worker in body["workers"]:
        assert set(worker) >= SEED_WORKER_FIELDS
        assert {"pool", "provider", "provider_id", "loaded_models", "state"} <= set(worker)
        assert worker["status"] == "idle"
        assert worker["health_status"] is True
        assert worker["port"] == int(worker["endpoint"].rsplit(":", 1)[1])
    assert by_pool["cloud"]["provider"] == "novita"
    assert by_pool["cloud"]["pod_name"].endswith(by_pool["cloud"]["id"])  # the instance name carries the id

    busy = fleet.usable_workers()[0]
    await fleet.set_assignments(busy.id, ["task-a"])
    await fleet.note_loaded_models(busy.id, ["flux1-dev-fp8.safetensors"])
    one = (await client.get(f"/api/v1/workers/{busy.id}")).json()
    assert one["status"] == "running"
    assert one["state"] == "busy"
    assert one["current_task_id"] == "task-a"
    assert one["loaded_models"] == ["flux1-dev-fp8.safetensors"]

    metrics = (await client.get("/api/v1/workers/metrics")).json()
    assert metrics["total_workers"] == 2
    assert metrics["running_workers"] == 1
    assert metrics["idle_workers"] == 1
    assert metrics["starting_workers"] == metrics["failed_workers"] == 0
    assert metrics["pools"]["cloud"] == {
        "provider": "novita",
        "min_workers": 1,
        "max_workers": 1,
        "workers": {"idle": 1},
    }
    only_busy = (await client.get("/api/v1/workers", params={"state": "busy"})).json()
    assert [worker["id"] for worker in only_busy["workers"]] == [busy.id]


async def test_errors_are_in_the_error_shape(api: tuple[httpx.AsyncClient, FleetManager]) -> None:
    client, fleet = api
    assert_error(await client.get("/api/v1/workers/no-such-worker"), 404, "not_found")
    assert_error(await client.delete("/api/v1/workers/no-such-worker"), 404, "not_found")
    assert_error(await client.post("/api/v1/workers/no-such-worker/drain"), 404, "not_found")
    assert_error(await client.get("/api/v1/workers", params={"state": "sleepy"}), 422, "validation_error")
    static = next(worker for worker in fleet.workers() if worker.pool == "default")
    assert_error(await client.delete(f"/api/v1/workers/{static.id}"), 409, "conflict")
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    assert_error(await client.delete(f"/api/v1/workers/{static.id}", headers=tenant), 403, "forbidden")
    assert (await client.get("/api/v1/workers", headers=tenant)).status_code == 200
    response = await client.get("/api/v1/workers", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_delete_terminates_and_the_floor_replaces(
    api: tuple[httpx.AsyncClient, FleetManager], novita: NovitaEmulator
) -> None:
    client, fleet = api
    cloud = next(worker for worker in fleet.workers() if worker.pool == "cloud")
    response = await client.delete(f"/api/v1/workers/{cloud.id}")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "terminated"
    assert novita.instances[str(cloud.provider_id)].status in ("toRemove", "removing", "removed")
    gone = (await client.get(f"/api/v1/workers/{cloud.id}")).json()
    assert gone["status"] == "terminated"
    # min_workers 1: a replacement comes up.
    await eventually(lambda: _cloud_ready_other_than(fleet, cloud.id), what="a replacement cloud worker")


async def _cloud_ready_other_than(fleet: FleetManager, worker_id: str) -> bool:
    return any(w.pool == "cloud" and w.id != worker_id for w in fleet.usable_workers())


async def test_drain_waits_for_the_task_then_terminates(api: tuple[httpx.AsyncClient, FleetManager]) -> None:
    client, fleet = api
    cloud = next(worker for worker in fleet.workers() if worker.pool == "cloud")
    await fleet.set_assignments(cloud.id, ["task-b"])
    response = await client.post(f"/api/v1/workers/{cloud.id}/drain")
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "draining"
    assert cloud.id not in {w.id for w in fleet.usable_workers()}, "a draining worker gets no new task"
    passes = fleet.reconcile_passes
    await eventually(lambda: _passes_since(fleet, passes, 3), what="the reconciler ran")
    assert cloud.state.value == "draining", "a worker holding a task is never stopped"
    await fleet.set_assignments(cloud.id, [])
    await eventually(
        lambda: _state_of(client, cloud.id, "terminated"), what="terminated once its task is done"
    )


async def _passes_since(fleet: FleetManager, before: int, count: int) -> bool:
    return fleet.reconcile_passes >= before + count


async def _state_of(client: httpx.AsyncClient, worker_id: str, state: str) -> bool:
    body: dict[str, Any] = (await client.get(f"/api/v1/workers/{worker_id}")).json()
    return body["state"] == state


async def test_a_tenant_sees_workers_without_their_tasks_or_addresses(
    api: tuple[httpx.AsyncClient, FleetManager],
) -> None:
    client, fleet = api
    static = next(worker for worker in fleet.workers() if worker.pool == "default")
    await fleet.set_assignments(static.id, ["someone-elses-task"])
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    seen = (await client.get("/api/v1/workers", headers=tenant)).json()["workers"]
    assert {worker["id"] for worker in seen} == {worker.id for worker in fleet.workers()}
    one = (await client.get(f"/api/v1/workers/{static.id}", headers=tenant)).json()
    for worker in [*seen, one]:
        assert worker["current_task_id"] is None
        assert worker["current_task_ids"] == []
        assert worker["endpoint"] is None
        assert worker["port"] is None
        assert worker["provider_id"] is None
        assert worker["pod_name"] == worker["id"]
        assert set(worker["info"]) <= {"ready_at", "startup_s"}
        assert "someone-elses-task" not in str(worker)
        assert "127.0.0.1" not in str(worker)
    assert one["state"] == "busy"  # what a tenant may know: the worker is taken
    # The admin (and open mode) still sees everything.
    full = (await client.get(f"/api/v1/workers/{static.id}")).json()
    assert full["current_task_ids"] == ["someone-elses-task"]
    assert full["endpoint"] == static.endpoint
    assert full["pod_name"] == static.provider_id


async def test_undrain_gives_a_drained_static_worker_tasks_again(
    api: tuple[httpx.AsyncClient, FleetManager],
) -> None:
    client, fleet = api
    static = next(worker for worker in fleet.workers() if worker.pool == "default")
    assert (await client.post(f"/api/v1/workers/{static.id}/drain")).json()["state"] == "draining"
    passes = fleet.reconcile_passes
    await eventually(lambda: _passes_since(fleet, passes, 3), what="the reconciler ran")
    assert static.id not in {w.id for w in fleet.usable_workers()}, "a static worker stays draining"

    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    assert_error(await client.post(f"/api/v1/workers/{static.id}/undrain", headers=tenant), 403, "forbidden")
    response = await client.post(f"/api/v1/workers/{static.id}/undrain")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "idle"
    await eventually(lambda: _usable(fleet, static.id), what="the undrained worker gets tasks again")
    # Undraining a worker that is not draining changes nothing.
    again = await client.post(f"/api/v1/workers/{static.id}/undrain")
    assert again.status_code == 200
    assert again.json()["state"] == "idle"
    assert_error(await client.post("/api/v1/workers/no-such-worker/undrain"), 404, "not_found")


async def test_undrain_refuses_a_worker_on_its_way_out(
    api: tuple[httpx.AsyncClient, FleetManager],
) -> None:
    client, fleet = api
    cloud = next(worker for worker in fleet.workers() if worker.pool == "cloud")
    assert (await client.delete(f"/api/v1/workers/{cloud.id}")).json()["state"] == "terminated"
    assert_error(await client.post(f"/api/v1/workers/{cloud.id}/undrain"), 409, "conflict")


async def _usable(fleet: FleetManager, worker_id: str) -> bool:
    return worker_id in {w.id for w in fleet.usable_workers()}
