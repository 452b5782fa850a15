"""The gateway's working parts for one application, shared by its routes and its WebSocket: queuing a
ComfyUI prompt through the task service, cancelling, reading the caller's tasks, finding which client a
prompt belongs to, and the queue length ComfyUI clients are told."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from comfyfleet.domain import TERMINAL_STATUSES, Task, TaskStatus
from comfyfleet.events import TaskEvent
from comfyfleet.gateway import shapes
from comfyfleet.gateway.errors import comfyui_rejection
from comfyfleet.gateway.prompt import attach_uploads, graph_to_run, parse_prompt
from comfyfleet.gateway.uploads import UploadStore
from comfyfleet.http.auth import Principal
from comfyfleet.http.pages import ByteBudget
from comfyfleet.http.services import Services
from comfyfleet.store import NotFound, StoreError
from comfyfleet.tasks import CancelTask, Submitted, TaskCommandError, TaskNotFound, TaskStateConflict

logger = logging.getLogger(__name__)

_OWNER_CACHE_SIZE = 10_000
_ENDED_CACHE_SIZE = 16  # tasks with their graphs: a few, for the history read each client makes at the end
# Every socket's status frame reads the queue length; one read per tenant this often serves them all.
_QUEUE_REMAINING_TTL_S = 0.25
# Tasks read at once by a listing, without payloads (a gateway task's metadata still holds the prompt's
# extra_data, with the UI workflow ComfyUI's frontend sends along).
_PAGE = 100


_QUEUE_CHANGES = TERMINAL_STATUSES | {TaskStatus.PENDING}


def changes_queue_length(event: TaskEvent) -> bool:
    """Whether the event may change ComfyUI's queue length (pending plus running): a task queued (or queued
    again) or ended. A start leaves it as it was."""
    return event.type == "status" and event.data.get("status") in _QUEUE_CHANGES


class Gateway:
    """One per application, built by the composition root around the application's services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.store = services.store
        self.outputs = services.outputs
        self.bus = services.bus
        self.catalogue = services.catalogue
        self.uploads = UploadStore(services.outputs) if services.outputs is not None else None
        self._owners: OrderedDict[str, str | None] = OrderedDict()  # task id -> client id (None: no client)
        self._remaining: dict[str | None, tuple[float, int]] = {}
        self._ended: OrderedDict[str, Task] = OrderedDict()  # the last tasks this replica ended, by id
        self._remaining_lock = asyncio.Lock()
        self._remaining_generation = 0  # bumped by every change: a read begun before it is not kept
        if self.bus is not None:
            # Every queueing and ending, the dispatcher's and other replicas' too.
            self.bus.add_listener(self._on_event)
        else:  # no live events: the task service's own changes are all there is to hear of
            services.tasks.add_listener(lambda _task: self.forget_remaining())

    # -- who a prompt belongs to ----------------------------------------------------------------
    def remember(self, task_id: str, client_id: str | None) -> None:
        self._owners[task_id] = client_id
        self._owners.move_to_end(task_id)
        while len(self._owners) > _OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)

    def known_client_of(self, task_id: str) -> tuple[bool, str | None]:
        """``(True, client id)`` when this replica knows whose prompt the task is, else ``(False, None)``."""
        if task_id in self._owners:
            return True, self._owners[task_id]
        return False, None

    async def client_of(self, task_id: str) -> str | None:
        if task_id in self._owners:
            return self._owners[task_id]
        try:
            task = await self.store.get_task(task_id)
        except (NotFound, StoreError):
            return None
        client_id = shapes.client_id_of(task)
        self.remember(task_id, client_id)
        return client_id

    # -- queue length ---------------------------------------------------------------------------
    async def queue_remaining(self, tenant: str | None) -> int:
        """Pending plus running tasks the caller can see (ComfyUI's ``exec_info.queue_remaining``)."""
        async with self._remaining_lock:
            cached = self._remaining.get(tenant)
            now = time.monotonic()
            if cached is not None and now - cached[0] < _QUEUE_REMAINING_TTL_S:
                return cached[1]
            generation = self._remaining_generation
            try:
                # From the store's counters: no read grows with the queue.
                metrics = await self.store.queue_metrics(tenant=tenant)
                value = metrics.pending_tasks + metrics.running_tasks
            except StoreError:
                return cached[1] if cached else 0
            if generation == self._remaining_generation:
                self._remaining[tenant] = (now, value)
            return value

    def _on_event(self, event: TaskEvent) -> None:
        if changes_queue_length(event):
            self.forget_remaining()
        ended = event.task
        if ended is not None and ended.status in TERMINAL_STATUSES:
            # An ended task never changes again; its client reads its history right after the end.
            self._ended[ended.id] = ended
            while len(self._ended) > _ENDED_CACHE_SIZE:
                self._ended.popitem(last=False)

    def forget_remaining(self) -> None:
        """Called on every change of the queue's length before the sockets hear of it: they read a fresh
        length, and a read begun before the change is not kept."""
        self._remaining_generation += 1
        self._remaining.clear()

    # -- commands -------------------------------------------------------------------------------
    async def queue_prompt(self, body: Any, tenant: str) -> Submitted:
        """Read a ``POST /prompt`` body as ComfyUI would and submit it as a task (``PromptRejected``: ComfyUI's
        400 answer)."""
        request = parse_prompt(body, self.settings.limits)
        graph = graph_to_run(request)
        inputs = []
        if self.uploads is not None:
            inputs = await attach_uploads(
                graph, tenant, self.uploads, max_bytes=self.settings.limits.max_input_bytes
            )
        try:
            submitted = await self.services.tasks.submit(request.command(tenant, graph, inputs))
        except TaskCommandError as exc:
            raise comfyui_rejection(exc, graph) from exc
        if submitted.created:
            self.remember(submitted.task.id, request.client_id)
            logger.info("gateway_prompt_queued task_id=%s client_id=%s", submitted.task.id, request.client_id)
        return submitted

    async def cancel(self, task_ids: Iterable[str], principal: Principal) -> None:
        """Cancel these tasks of the caller (ComfyUI's queue deletions and interrupts); a task that ended or
        vanished meanwhile is left alone, as ComfyUI ignores an id it no longer has."""
        for task_id in task_ids:
            try:
                await self.services.tasks.cancel(CancelTask(task_id, principal.visible_tenant))
            except (TaskNotFound, TaskStateConflict):
                continue

    # -- reads ----------------------------------------------------------------------------------
    async def sees_task(self, task_id: str, principal: Principal) -> bool:
        """Whether the caller has a task of that id (a light read: no payload, result or attempts)."""
        if not shapes.is_canonical_uuid(task_id):
            return False
        return await self.store.task_status(task_id, tenant=principal.visible_tenant) is not None

    async def visible_task(self, task_id: str, principal: Principal) -> Task | None:
        """The caller's task of that id; None for an id that is not a prompt id or not the caller's."""
        if not shapes.is_canonical_uuid(task_id):
            return None
        ended = self._ended.get(task_id)
        if ended is not None and principal.visible_tenant in (None, ended.tenant):
            return ended
        try:
            return await self.store.get_task(task_id, tenant=principal.visible_tenant)
        except NotFound:
            return None

    async def iter_tasks(
        self, principal: Principal, statuses: list[TaskStatus], cap: int
    ) -> AsyncGenerator[Task, None]:
        """Up to ``cap`` of the caller's tasks in ``statuses``, newest first, as lists read them (without their
        payloads), a page at a time."""
        cursor = None
        seen = 0
        while seen < cap:
            page = await self.store.list_tasks(
                tenant=principal.visible_tenant,
                statuses=statuses,
                limit=min(_PAGE, cap - seen),
                cursor=cursor,
            )
            for task in page.tasks:
                yield task
            seen += len(page.tasks)
            cursor = page.next_cursor
            if cursor is None:
                return

    async def encoded(
        self, task_ids: Iterable[str], encode: Callable[[Task], bytes], budget: ByteBudget
    ) -> list[tuple[str, bytes]]:
        """``(task id, encode(task))`` for these tasks, each read whole (with its payload) one at a time, in
        order, until the next would take the answer past ``budget``; a task gone meanwhile is skipped."""
        pieces = []
        for task_id in task_ids:
            try:
                task = await self.store.get_task(task_id)
            except NotFound:
                continue
            piece = encode(task)
            if not budget.take(piece):
                break
            pieces.append((task_id, piece))
        return pieces
