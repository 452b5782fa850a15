"""What both backends share: migrations on disk, paging cursors, leader keys and the in-process fan-out."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Self

from comfyfleet.domain import Task, WorkerMetrics, WorkerState
from comfyfleet.store.base import Conflict, InvalidArgument, NotFound, Notification, StoreClosed

logger = logging.getLogger("comfyfleet.store")

MAX_LIST_LIMIT = 1000
# A subscriber that stops reading loses its oldest wake-ups rather than growing without bound.
SUBSCRIPTION_BACKLOG = 10_000

# The column lists both backends select, in the order their row readers unpack (same names in both schemas).
TASK_COLUMNS = (
    "id, seq, tenant, workflow_id, priority, status, phase, payload, created_at, updated_at, worker_id, "
    "started_at, completed_at, result, error, error_kind, error_details, retry_count, max_retries, attempt, "
    "prompt_id, timeout_s, not_before, lease_owner, lease_expires_at, cancel_requested, idempotency_key, "
    "pool, inputs, webhook, metadata, progress, attempts"
)


def listed_task_columns(inputs_summary: str) -> str:
    """The columns of a task list, in ``TASK_COLUMNS``'s order, without what lists do not show: the payload
    (NULL, read as ``{}``) and the input files' bytes (the dialect's ``inputs_summary``: each input without
    its ``data``, with its ``size``). A list of large tasks then reads kilobytes, not their megabytes."""
    columns = {"payload": "NULL AS payload", "inputs": f"{inputs_summary} AS inputs"}
    return ", ".join(columns.get(name, name) for name in TASK_COLUMNS.split(", "))


def cursor_after(task: Task) -> str:
    """The ``cursor`` of a list page that goes on after ``task`` (newest first), for a caller that ends a
    page before the store's ``limit`` (e.g. at a byte budget)."""
    return encode_cursor(task.seq)


WORKER_COLUMNS = (
    "id, pool, provider, state, created_at, updated_at, endpoint, provider_id, current_task_ids, "
    "last_active_at, health_failures, loaded_models, node_types, error, labels, info"
)

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The numbered ``migrations/<dialect>/NNNN_name.sql`` files, in order."""
    folder = resources.files("comfyfleet.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers for {dialect}: {versions}")
    return tuple(found)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "seq" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"invalid cursor {cursor[:80]!r}: pass the next_cursor of a previous page"
        ) from exc


def pending_tenants_sql(tasks: str = "tasks") -> str:
    """The tenants with pending tasks, one index probe each: a loose scan of the ``tasks_pending_tenant`` index
    (``tasks`` names the table, with SQLite's ``INDEXED BY`` where the planner needs telling), never a walk
    over every pending task."""
    return (
        "WITH RECURSIVE tenants(name) AS ("
        f" SELECT min(tenant) FROM {tasks} WHERE status = 'pending'"
        " UNION ALL"
        f" SELECT (SELECT min(tenant) FROM {tasks} WHERE status = 'pending' AND tenant > tenants.name)"
        " FROM tenants WHERE name IS NOT NULL"
        ") SELECT name FROM tenants WHERE name IS NOT NULL"
    )


def not_pending(task_id: str, status: str | None) -> NotFound | Conflict:
    """Why a change that needs a pending task did not apply: unknown (or another tenant's), or it moved on."""
    if status is None:
        return NotFound(f"task {task_id} not found")
    return Conflict(f"task {task_id} is already {status}: only a pending task can be changed")


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")


def advisory_key(namespace: str, name: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same in every replica); namespaces keep leadership
    names apart from the store's own locks."""
    digest = hashlib.sha256(f"comfyfleet:{namespace}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def worker_metrics_from_counts(counts: dict[str, int]) -> WorkerMetrics:
    return WorkerMetrics(
        total_workers=sum(count for state, count in counts.items() if state != WorkerState.TERMINATED),
        idle_workers=counts.get(WorkerState.IDLE, 0),
        running_workers=counts.get(WorkerState.BUSY, 0),
        starting_workers=counts.get(WorkerState.STARTING, 0),
        failed_workers=counts.get(WorkerState.FAILED, 0),
        pending_workers=counts.get(WorkerState.PENDING, 0),
        terminating_workers=counts.get(WorkerState.TERMINATING, 0),
    )


class Subscription:
    """One ``listen()`` iterator. It is registered when created, so nothing published after ``listen()``
    returns is missed even before the first ``__anext__``. ``aclose()`` (or ``async with``) unsubscribes."""

    __slots__ = ("__weakref__", "_backlog", "_closed", "_hub", "_wakeup")

    def __init__(self, hub: NotificationHub) -> None:
        self._hub = hub
        self._backlog: deque[Notification] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def _offer(self, notification: Notification) -> None:
        if len(self._backlog) >= SUBSCRIPTION_BACKLOG:
            self._backlog.popleft()
            logger.warning("notification_dropped channel=%s", notification.channel)
        self._backlog.append(notification)
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notification:
        while not self._backlog:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._backlog.popleft()

    async def aclose(self) -> None:
        self._hub.unsubscribe(self)
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class NotificationHub:
    """In-process fan-out of notifications to every live subscription of one store."""

    def __init__(self) -> None:
        # Weak, so a subscription its owner dropped without closing does not pile up wake-ups forever.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._closed = False

    def subscribe(self) -> Subscription:
        if self._closed:
            raise StoreClosed("the store is closed")
        subscription = Subscription(self)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, notification: Notification) -> None:
        for subscription in list(self._subscriptions):
            subscription._offer(notification)

    def close(self) -> None:
        """End every subscription's iteration."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription._end()
        self._subscriptions.clear()
