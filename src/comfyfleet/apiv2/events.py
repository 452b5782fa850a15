"""``GET /api/v2/jobs/{id}/events``: a job's live state as server-sent events, in v2's catalogue.

On connect: a ``status`` event (with ``queue_position`` while queued), the latest ``progress`` and the latest
``preview`` if any; then every change. ``progress`` and ``preview`` are throttled to about two a second (the
newest one wins). When the job ends, an ``output`` event per output, then the terminal ``status`` (with the
outputs too), and the stream closes. Events come from comfyfleet's event bus, relayed between replicas; the
stream also re-reads the job every few seconds, so a lost event delays it but never stalls it. Previews
exist only on the replica running the job (they are kept in memory, never stored).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from comfyfleet.apiv2.base import AppDep, LinksDep, PrincipalDep, V2App
from comfyfleet.apiv2.errors import V2Error
from comfyfleet.apiv2.jobs import job_of
from comfyfleet.apiv2.wire import TERMINAL, Links, progress_snapshot
from comfyfleet.events import EventBus, Subscription, TaskEvent

router = APIRouter()

THROTTLE_S = 0.5  # at most two progress (and two preview) events a second
RECHECK_S = 2.0  # the job is re-read this often when no event came
_KEEPALIVE_S = 15


def _frame(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": kind, "data": json.dumps(data, separators=(",", ":"), default=str)}


class JobStream:
    """The frames of one job's stream, from its snapshot to its terminal status."""

    def __init__(self, app: V2App, job_id: str, links: Links) -> None:
        self.app = app
        self.job_id = job_id
        self.links = links
        self.status: str | None = None
        self.position: int | None = None
        self.pending: dict[str, dict[str, Any]] = {}  # throttled frames waiting: kind -> data
        self.sent_at: dict[str, float] = {}
        self.payload: dict[
            str, Any
        ] = {}  # the job's graph, for progress (how many nodes, which depend on which)

    async def frames(self, bus: EventBus) -> AsyncIterator[dict[str, str]]:
        with bus.subscribe(maxsize=1024) as subscription:  # before the snapshot: no change falls in between
            job = await self._job()
            for frame in self._status_frames(job, snapshot=True):
                yield frame
            if job["progress"] is not None and job["status"] == "running":
                yield _frame("progress", job["progress"])
            preview = self._preview()
            if preview is not None:
                yield _frame("preview", preview)
            if job["status"] in TERMINAL:
                return
            async for frame in self._follow(subscription):
                yield frame

    async def _follow(self, subscription: Subscription) -> AsyncIterator[dict[str, str]]:
        checked_at = time.monotonic()
        while True:
            event = await subscription.get(wait_s=self._wait_s(checked_at))
            for kind in list(self.pending):
                if self._due(kind):
                    self.sent_at[kind] = time.monotonic()
                    yield _frame(kind, self.pending.pop(kind))
            if event is not None and event.task_id == self.job_id and event.type in ("progress", "preview"):
                self._throttle(event)
                continue
            queue_moved = event is not None and event.type == "status" and self.status == "queued"
            own_change = event is not None and event.task_id == self.job_id and event.type == "status"
            if not (own_change or queue_moved or time.monotonic() - checked_at >= RECHECK_S):
                continue
            checked_at = time.monotonic()
            job = await self._job()
            for frame in self._status_frames(job, snapshot=False):
                yield frame
            if job["status"] in TERMINAL:
                return

    def _wait_s(self, checked_at: float) -> float:
        now = time.monotonic()
        waits = [max(0.0, checked_at + RECHECK_S - now)]
        waits += [max(0.0, self.sent_at.get(kind, 0.0) + THROTTLE_S - now) for kind in self.pending]
        return min(waits)

    def _due(self, kind: str) -> bool:
        return time.monotonic() - self.sent_at.get(kind, 0.0) >= THROTTLE_S

    def _throttle(self, event: TaskEvent) -> None:
        if event.type == "progress":
            progress = progress_snapshot(self.payload, event.data)
            if progress is not None:
                self.pending["progress"] = progress
        else:
            preview = self._preview()
            if preview is not None:
                self.pending["preview"] = preview

    async def _job(self) -> dict[str, Any]:
        task = await self.app.services.store.get_task(self.job_id)
        self.payload = task.payload if isinstance(task.payload, dict) else {}
        return await job_of(self.app, task, self.links)

    def _status_frames(self, job: dict[str, Any], *, snapshot: bool) -> list[dict[str, str]]:
        status, position = job["status"], job["queue_position"]
        if not snapshot and status == self.status and position == self.position:
            return []
        self.status, self.position = status, position
        frames = []
        if status in TERMINAL:
            frames += [_frame("output", output) for output in job["outputs"] if not snapshot]
            return [
                *frames,
                _frame("status", {"status": status, "queue_position": None, "outputs": job["outputs"]}),
            ]
        return [_frame("status", {"status": status, "queue_position": position})]

    def _preview(self) -> dict[str, Any] | None:
        previews = self.app.services.previews
        latest = previews.latest_preview(self.job_id) if previews is not None else None
        if latest is None:
            return None
        image, content_type, _ = latest
        return {
            "node_id": "",
            "content_type": content_type,
            "data_base64": base64.b64encode(image).decode("ascii"),
        }


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str, app: AppDep, principal: PrincipalDep, links: LinksDep
) -> EventSourceResponse:
    bus = app.services.bus
    if bus is None:
        raise V2Error(501, "not_implemented", "this server runs without live events; poll GET /jobs/{id}")
    await app.services.store.get_task(job_id, tenant=principal.visible_tenant)
    app.streams.check(principal.tenant)
    stream = JobStream(app, job_id, links)

    async def frames() -> AsyncIterator[dict[str, str]]:
        with app.streams.held(principal.tenant):
            async for frame in stream.frames(bus):
                yield frame

    return EventSourceResponse(frames(), ping=_KEEPALIVE_S, send_timeout=30)
