"""Live task events as server-sent events: one task's, or every task the caller can see."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from comfyfleet.api.routes.tasks import TaskId, checked_task_id
from comfyfleet.api.schemas import error_responses
from comfyfleet.domain import TERMINAL_STATUSES, TaskStatus
from comfyfleet.events import TaskEvent
from comfyfleet.http.deps import BusDep, EstimatorDep, PrincipalDep, StoreDep
from comfyfleet.http.wire import task_json
from comfyfleet.store import NotFound

router = APIRouter(tags=["events"])

# While a task waits, its queue position is re-read at most this often, and only after another task moved.
_POSITION_REFRESH_S = 0.5
_KEEPALIVE_S = 15


def _sse(event: TaskEvent, counter: int) -> dict[str, Any]:
    payload = {"task_id": event.task_id, "type": event.type, "ts": event.ts, **event.data}
    return {
        "event": event.type,
        "id": str(counter),
        "data": json.dumps(payload, separators=(",", ":"), default=str),
    }


@router.get(
    "/tasks/{task_id}/events",
    summary="Follow one task live (server-sent events)",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "An event stream."},
        **error_responses(401, 404, 503),
    },
)
async def task_events(
    task_id: TaskId,
    principal: PrincipalDep,
    store: StoreDep,
    bus: BusDep,
    estimator: EstimatorDep,
) -> EventSourceResponse:
    """Events of one task, starting with a `snapshot` of the task as it stands:
    `queue_position` while it waits (1 = next, with `estimated_start_s`), `status` on every status or phase
    change, `progress` with
    the executing node and sampler step (`node`, `class_type`, `value`, `max`). The stream ends after the
    event that makes the task completed, failed or cancelled."""
    checked = checked_task_id(task_id)
    task = await store.get_task(checked, tenant=principal.visible_tenant)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        counter = 0
        with bus.subscribe() as subscription:
            current = await store.get_task(checked)
            position = await store.queue_position(checked) if current.status is TaskStatus.PENDING else None
            estimate = await estimator.start_in_s(current, position)
            counter += 1
            snapshot = task_json(current, queue_position=position, estimated_start_s=estimate)
            yield {
                "event": "snapshot",
                "id": str(counter),
                "data": json.dumps(snapshot, separators=(",", ":"), default=str),
            }
            if current.is_terminal:
                return
            pending = current.status is TaskStatus.PENDING
            moved = False  # another task changed status since the position was last read
            read_at = time.monotonic()
            while True:
                wait_s = (
                    max(0.0, read_at + _POSITION_REFRESH_S - time.monotonic()) if pending and moved else None
                )
                event = await subscription.get(wait_s=wait_s)
                if event is not None and event.task_id == checked:
                    counter += 1
                    yield _sse(event, counter)
                    if event.type == "status":
                        pending = event.data.get("status") == TaskStatus.PENDING
                        moved = moved or pending  # back in the queue, or its priority changed
                        if event.data.get("status") in TERMINAL_STATUSES:
                            return
                    continue
                if not pending:
                    continue
                if event is not None and event.type == "status":
                    moved = True
                # The queue moves only when some task changes status; read the position then, at most
                # once per refresh interval, so a deep queue is not counted over and over.
                if not moved or time.monotonic() - read_at < _POSITION_REFRESH_S:
                    continue
                moved, read_at = False, time.monotonic()
                try:
                    now = await store.queue_position(checked)
                except NotFound:
                    return
                if now is not None and now != position:
                    position = now
                    counter += 1
                    data = {"queue_position": now, "estimated_start_s": await estimator.start_in_s(task, now)}
                    yield _sse(TaskEvent("queue_position", checked, task.tenant, data), counter)

    return EventSourceResponse(stream(), ping=_KEEPALIVE_S, send_timeout=30)


@router.get(
    "/events",
    summary="Follow every visible task live (server-sent events)",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "An event stream."},
        **error_responses(401, 503),
    },
)
async def all_events(principal: PrincipalDep, bus: BusDep) -> EventSourceResponse:
    """`status` and `progress` events of every task the caller can see (its tenant's; all for an admin)."""

    async def stream() -> AsyncIterator[dict[str, Any]]:
        counter = 0
        with bus.subscribe(tenant=principal.visible_tenant, maxsize=1024) as subscription:
            async for event in subscription:
                counter += 1
                yield _sse(event, counter)
                await asyncio.sleep(0)

    return EventSourceResponse(stream(), ping=_KEEPALIVE_S, send_timeout=30)
