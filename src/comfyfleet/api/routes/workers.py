"""``/api/v1/workers``: the fleet as the seed's Worker objects, its metrics, and drain / undrain / remove.

Reads come from the store, so every replica answers the same; drain, undrain and remove go through the worker
manager (on a replica that is not the autoscaler's leader, they are left on the record for the leader to carry
out). They need an admin key when API keys are configured: workers are shared by every tenant. For the same
reason a tenant's key sees a worker without what belongs to other tenants or to the operator: the tasks it
holds, where its ComfyUI answers, its provider's names for it and its errors.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.responses import Response

from comfyfleet.api.schemas import error_responses
from comfyfleet.domain import Worker, WorkerState
from comfyfleet.fleet.errors import FleetClosed, UnknownWorker, WorkerStateConflict
from comfyfleet.http.auth import Principal
from comfyfleet.http.deps import PrincipalDep, ServicesDep, require_fleet
from comfyfleet.http.errors import ApiError
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.services import Services
from comfyfleet.http.wire import utc

router = APIRouter(tags=["workers"])

# The seed's WorkerStatus words for our states: `running` is a worker executing tasks.
SEED_STATUS = {
    WorkerState.PENDING: "starting",
    WorkerState.STARTING: "starting",
    WorkerState.IDLE: "idle",
    WorkerState.BUSY: "running",
    WorkerState.DRAINING: "draining",
    WorkerState.TERMINATING: "terminating",
    WorkerState.TERMINATED: "terminated",
    WorkerState.FAILED: "failed",
}


class WorkerOut(BaseModel):
    """The seed's Worker fields first, then comfyfleet's. Seen with a tenant's key (not an admin's), the
    fields that belong to other tenants or to the operator are empty: ``pod_name`` is the worker's id, and
    ``endpoint``, ``port``, ``current_task_id``, ``provider_id`` and ``error`` are null, ``current_task_ids``
    empty and ``info`` holds only ``ready_at`` and ``startup_s``."""

    id: str
    pod_name: str = Field(
        description="The provider's name for it: container or instance name, URL, process id."
    )
    status: str = Field(description="starting, idle, running, draining, terminating, terminated or failed")
    endpoint: str | None = Field(description="Base URL of the worker's ComfyUI, once known (admin only)")
    port: int | None
    current_task_id: str | None = Field(
        description="The first task it holds (current_task_ids has all; admin only)"
    )
    created_at: datetime
    last_active_at: datetime | None
    health_status: bool = Field(description="Ready and its last health probe passed")
    state: str = Field(
        description="The lifecycle state: pending, starting, idle, busy, draining, terminating, terminated, failed"
    )
    pool: str
    provider: str
    provider_id: str | None
    loaded_models: list[str]
    current_task_ids: list[str]
    health_failures: int
    error: str | None
    updated_at: datetime
    node_types: int | None = Field(description="How many node types its ComfyUI offers (null until read)")
    info: dict[str, Any]


class WorkerListOut(BaseModel):
    workers: list[WorkerOut]
    count: int


class PoolMetricsOut(BaseModel):
    provider: str
    min_workers: int
    max_workers: int
    workers: dict[str, int]


class WorkerMetricsOut(BaseModel):
    total_workers: int
    idle_workers: int
    running_workers: int
    starting_workers: int
    failed_workers: int
    pending_workers: int
    terminating_workers: int
    pools: dict[str, PoolMetricsOut] = Field(
        description="Per configured pool: its bounds and workers per state"
    )


# What a tenant's key sees of a worker's info: nothing that names an address, a container or an error.
_TENANT_INFO = frozenset({"ready_at", "startup_s"})


def worker_json(worker: Worker, principal: Principal) -> dict[str, Any]:
    """The wire form of a worker: all of it for an admin (and in open mode); for a tenant, without other
    tenants' task ids and the operator's details (its URL, port, provider id and names, errors)."""
    body = _worker_json(worker)
    if principal.admin:
        return body
    return body | {
        "pod_name": worker.id,
        "endpoint": None,
        "port": None,
        "current_task_id": None,
        "current_task_ids": [],
        "provider_id": None,
        "error": None,
        "info": {key: value for key, value in body["info"].items() if key in _TENANT_INFO},
    }


def _worker_json(worker: Worker) -> dict[str, Any]:
    info = worker.info or {}
    pod_name = str(info.get("container_name") or info.get("instance_name") or worker.provider_id or worker.id)
    return {
        "id": worker.id,
        "pod_name": pod_name,
        "status": SEED_STATUS.get(worker.state, worker.state.value),
        "endpoint": worker.endpoint,
        "port": worker.port,
        "current_task_id": worker.current_task_ids[0] if worker.current_task_ids else None,
        "created_at": utc(worker.created_at),
        "last_active_at": utc(worker.last_active_at),
        "health_status": worker.health_status,
        "state": worker.state.value,
        "pool": worker.pool,
        "provider": worker.provider,
        "provider_id": worker.provider_id,
        "loaded_models": list(worker.loaded_models),
        "current_task_ids": list(worker.current_task_ids),
        "health_failures": worker.health_failures,
        "error": worker.error,
        "updated_at": utc(worker.updated_at),
        "node_types": len(worker.node_types) if worker.node_types is not None else None,
        "info": {key: value for key, value in info.items() if key != "system"},
    }


async def _current_workers(
    services: Services, *, pool: str | None = None, include_gone: bool = False
) -> list[Worker]:
    """The store's records, each replaced by the manager's own copy when it has one: busy/idle and loaded
    models are written to the store behind the manager's back (batched), so its copy is the fresher."""
    workers = await services.store.list_workers(pool=pool, include_gone=include_gone)
    if services.fleet is None:
        return workers
    cached = {worker.id: worker for worker in services.fleet.workers(pool=pool)}
    return [cached.get(worker.id, worker) for worker in workers]


def _require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(
            403,
            "forbidden",
            "workers are shared by every tenant: draining, undraining or removing one needs an admin key",
        )


def _parse_states(raw: str | None) -> set[WorkerState] | None:
    if not raw:
        return None
    states = set()
    for part in raw.split(","):
        part = part.strip().lower()
        try:
            states.add(WorkerState(part))
        except ValueError:
            valid = ", ".join(state.value for state in WorkerState)
            raise ApiError(
                422,
                "validation_error",
                f"unknown worker state {part!r}; use {valid}",
                details={
                    "errors": [
                        {"loc": ["query", "state"], "message": f"unknown state {part!r}", "type": "enum"}
                    ]
                },
            ) from None
    return states


@router.get(
    "/workers",
    response_model=WorkerListOut,
    summary="List workers",
    responses=error_responses(401, 422, 503),
)
async def list_workers(
    principal: PrincipalDep,
    services: ServicesDep,
    pool: Annotated[str | None, Query(description="Only this pool's workers")] = None,
    state: Annotated[str | None, Query(description="Comma-separated states, e.g. idle,busy")] = None,
    include_gone: Annotated[bool, Query(description="Include terminated workers (kept for a while)")] = False,
) -> Response:
    """Every worker of the fleet (terminated ones only with ``include_gone``), oldest first."""
    states = _parse_states(state)
    include_gone = include_gone or bool(states and WorkerState.TERMINATED in states)
    workers = await _current_workers(services, pool=pool, include_gone=include_gone)
    if states is not None:
        workers = [worker for worker in workers if worker.state in states]
    workers.sort(key=lambda worker: (worker.created_at, worker.id))
    return JSONBody(
        {"workers": [worker_json(worker, principal) for worker in workers], "count": len(workers)}
    )


@router.get(
    "/workers/metrics",
    response_model=WorkerMetricsOut,
    summary="Worker metrics",
    responses=error_responses(401, 503),
)
async def worker_metrics(principal: PrincipalDep, services: ServicesDep) -> Response:
    """The seed's WorkerMetrics (``running_workers`` are busy ones; terminated workers are not counted), plus
    pending and terminating workers and a per-pool breakdown."""
    workers = [w for w in await _current_workers(services) if w.state is not WorkerState.TERMINATED]
    counts = Counter(worker.state for worker in workers)
    pools: dict[str, dict[str, Any]] = {}
    if services.fleet is not None:
        for name, pool in services.fleet.pools.items():
            pools[name] = {
                "provider": pool.provider,
                "min_workers": pool.min_workers,
                "max_workers": pool.max_workers,
                "workers": {},
            }
    for worker in workers:
        entry = pools.get(worker.pool)
        if entry is not None:
            entry["workers"][worker.state.value] = entry["workers"].get(worker.state.value, 0) + 1
    return JSONBody(
        {
            "total_workers": len(workers),
            "idle_workers": counts[WorkerState.IDLE],
            "running_workers": counts[WorkerState.BUSY],
            "starting_workers": counts[WorkerState.STARTING],
            "failed_workers": counts[WorkerState.FAILED],
            "pending_workers": counts[WorkerState.PENDING],
            "terminating_workers": counts[WorkerState.TERMINATING] + counts[WorkerState.DRAINING],
            "pools": pools,
        }
    )


@router.get(
    "/workers/{worker_id}",
    response_model=WorkerOut,
    summary="Get a worker",
    responses=error_responses(401, 404, 503),
)
async def get_worker(worker_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    """One worker, terminated ones included while their record is kept."""
    fleet = services.fleet
    cached = {worker.id: worker for worker in fleet.workers()} if fleet is not None else {}
    worker = cached.get(worker_id) or await services.store.get_worker(worker_id)
    return JSONBody(worker_json(worker, principal))


async def _act(services: Services, principal: Principal, worker_id: str, action: str) -> Worker:
    _require_admin(principal)
    fleet = await require_fleet(services)
    try:
        if action == "drain":
            return await fleet.drain(worker_id)
        if action == "undrain":
            return await fleet.undrain(worker_id)
        return await fleet.remove(worker_id)
    except UnknownWorker:
        raise ApiError(404, "not_found", f"no worker {worker_id!r}") from None
    except WorkerStateConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except FleetClosed as exc:
        raise ApiError(503, "fleet_unavailable", str(exc)) from None


@router.post(
    "/workers/{worker_id}/drain",
    response_model=WorkerOut,
    status_code=202,
    summary="Drain a worker",
    responses=error_responses(401, 403, 404, 503),
)
async def drain_worker(worker_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Stop giving the worker new tasks; it is terminated once the tasks it holds are done. A worker that is
    not ready yet is removed at once. 202: the drain goes on in the background."""
    worker = await _act(services, principal, worker_id, "drain")
    return JSONBody(worker_json(worker, principal), status_code=202)


@router.post(
    "/workers/{worker_id}/undrain",
    response_model=WorkerOut,
    summary="Undrain a worker",
    responses={
        202: {
            "model": WorkerOut,
            "description": "This replica is not the fleet's leader: the undrain is left for the leader, and "
            "the worker is shown still draining.",
        },
        **error_responses(401, 403, 404, 409, 503),
    },
)
async def undrain_worker(worker_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Give a draining worker tasks again: it is back to idle (busy while it holds tasks), the way out of a
    drain for a static worker, which otherwise stays draining. A worker that is not draining is returned as
    it is; 409 for one that failed or whose termination has begun."""
    worker = await _act(services, principal, worker_id, "undrain")
    status = 202 if worker.state is WorkerState.DRAINING else 200
    return JSONBody(worker_json(worker, principal), status_code=status)


@router.delete(
    "/workers/{worker_id}",
    response_model=WorkerOut,
    summary="Remove a worker",
    responses=error_responses(401, 403, 404, 409, 503),
)
async def remove_worker(worker_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Terminate the worker now (its container or instance is deleted; a busy worker's tasks are retried on
    other workers). 409 for a static worker: remove its URL from the configuration instead."""
    worker = await _act(services, principal, worker_id, "remove")
    return JSONBody(worker_json(worker, principal))
