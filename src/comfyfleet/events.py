"""Live task events: an in-process fan-out that also crosses replicas through the store's notifications.

The dispatcher publishes status changes and progress, the task service the changes it makes itself (a
submission, a cancel, a new priority); the API streams them as server-sent events, the gateway as ComfyUI
frames, and the webhook deliverer wakes on endings. Each subscriber has a bounded queue: a slow reader loses old progress frames, never blocks the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.background import Background
from comfyfleet.domain import Task, TaskStatus
from comfyfleet.store import Store

logger = logging.getLogger(__name__)

# Notification channels, shared by every replica (PostgreSQL NOTIFY; in-process on SQLite).
TASKS_CHANNEL = "tasks"  # new work (a submission, a task back in the queue): dispatchers look again
CANCEL_CHANNEL = "cancel"  # payload: the id of a running task whose cancel was asked for
EVENTS_CHANNEL = "events"  # live task events relayed between replicas


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """``type``: ``status`` (status/phase changed), ``progress`` (node/step), ``queue_position``."""

    type: str
    task_id: str
    tenant: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    # The task as this change left it, in the replica that made the change only (neither sent to other
    # replicas nor shown to clients): a waiting request answers with it instead of reading it again, and the
    # webhook deliverer skips endings without a webhook.
    task: Task | None = None

    def to_json(self) -> str:
        shown = {
            "type": self.type,
            "task_id": self.task_id,
            "tenant": self.tenant,
            "data": self.data,
            "ts": self.ts,
        }
        return json.dumps(shown, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str) -> TaskEvent:
        raw = json.loads(text)
        return cls(
            type=raw["type"], task_id=raw["task_id"], tenant=raw["tenant"], data=raw["data"], ts=raw["ts"]
        )


def status_event(task: Task) -> TaskEvent:
    """The ``status`` event of a task as it stands, for every change of it (a submission, a cancel, a new
    priority, each step of an attempt); a completed task's event carries its outputs."""
    data: dict[str, Any] = {
        "status": task.status.value,
        "phase": task.phase.value if task.phase else None,
        "worker_id": task.worker_id,
        "attempt": task.attempt,
        "retry_count": task.retry_count,
    }
    if task.error:
        data["error"] = task.error
        data["error_kind"] = task.error_kind
    if task.status is TaskStatus.COMPLETED and task.result:
        data["outputs"] = task.result.get("outputs", [])
    return TaskEvent("status", task.id, task.tenant, data, task=task)


class Subscription:
    def __init__(
        self,
        bus: EventBus,
        task_id: str | None,
        tenant: str | None,
        maxsize: int,
        only: Callable[[TaskEvent], bool] | None = None,
    ) -> None:
        self._bus = bus
        self.task_id = task_id
        self.tenant = tenant
        self.only = only
        self.queue: asyncio.Queue[TaskEvent] = asyncio.Queue(maxsize)

    def wants(self, event: TaskEvent) -> bool:
        if self.task_id is not None and event.task_id != self.task_id:
            return False
        if self.tenant is not None and event.tenant != self.tenant:
            return False
        return self.only is None or self.only(event)

    def offer(self, event: TaskEvent) -> None:
        if self.queue.full():
            # Drop the oldest event: for live progress the newest frame is what matters.
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(event)

    async def get(self, wait_s: float | None = None) -> TaskEvent | None:
        """The next event, or None after ``wait_s`` seconds without one (``None``: wait forever)."""
        try:
            async with asyncio.timeout(wait_s):  # not wait_for: that starts a task per call
                return await self.queue.get()
        except TimeoutError:
            return None

    def ready(self, limit: int) -> list[TaskEvent]:
        """The events already queued, oldest first, up to ``limit``, without waiting."""
        events: list[TaskEvent] = []
        while len(events) < limit and not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    def __aiter__(self) -> AsyncIterator[TaskEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TaskEvent]:
        while True:
            yield await self.queue.get()


class EventBus:
    """Fan-out of :class:`TaskEvent` to subscribers of this replica, relayed to the others via the store."""

    def __init__(
        self, store: Store | None = None, *, replica_id: str = "local", shared: bool = False
    ) -> None:
        self._store = store
        self._replica_id = replica_id
        # Only a store shared by several replicas needs the relay; SQLite serves one replica.
        self._shared = shared and store is not None
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[TaskEvent], None]] = []
        self._relays = Background()

    @contextlib.contextmanager
    def subscribe(
        self,
        task_id: str | None = None,
        tenant: str | None = None,
        maxsize: int = 256,
        *,
        only: Callable[[TaskEvent], bool] | None = None,
    ) -> Iterator[Subscription]:
        """Events of ``task_id`` (or every task), of ``tenant`` (or every tenant), and for which ``only`` is
        true (an event a subscriber would ignore is not queued, nor the subscriber woken for it)."""
        subscription = Subscription(self, task_id, tenant, maxsize, only)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def add_listener(self, listener: Callable[[TaskEvent], None]) -> None:
        """Call ``listener`` with every event of this replica and relayed from the others, before any
        subscriber is offered it (it must not block: it runs in the publisher's step)."""
        self._listeners.append(listener)

    def _fan_out(self, event: TaskEvent) -> None:
        for listener in self._listeners:
            listener(event)
        for subscription in tuple(self._subscribers):
            if subscription.wants(event):
                subscription.offer(event)

    async def publish(self, event: TaskEvent) -> None:
        self._fan_out(event)
        if self._shared and self._store is not None:
            # Relayed without waiting for it: the publisher (the dispatcher, between its steps) does not wait
            # a database round trip per event. Relays start in publishing order and the store sends its
            # notifications in the order they were asked for, so the other replicas hear them in order.
            envelope = json.dumps({"origin": self._replica_id, "event": event.to_json()})
            self._relays.start(self._relay(self._store, envelope, event.task_id))

    @staticmethod
    async def _relay(store: Store, envelope: str, task_id: str) -> None:
        try:
            await store.notify(EVENTS_CHANNEL, envelope)
        except Exception:  # a lost live event must never fail the dispatcher's write path
            logger.warning("event_relay_failed task_id=%s", task_id, exc_info=True)

    def receive_relayed(self, payload: str) -> None:
        """Deliver an event another replica published (called by the runtime's notification loop)."""
        try:
            envelope = json.loads(payload)
            if envelope.get("origin") == self._replica_id:
                return
            self._fan_out(TaskEvent.from_json(envelope["event"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("event_relay_malformed payload=%r", payload[:200])
