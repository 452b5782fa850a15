"""The store's behaviour, written once for every SQL dialect.

:class:`SqlStore` implements the task queue, the dispatcher's side, the worker records and the webhook outbox
over a small seam that each dialect fills in (as procrastinate's connectors do):

- ``sql``: its :class:`~comfyfleet.store._statements.Statements` (the SQL text);
- ``codec``: how it stores JSON and times (:class:`~comfyfleet.store._rows.Codec`);
- ``_read(sql, params)`` and ``_write(sql, params)``: run one statement with named parameters and return its
  rows, raising :class:`~comfyfleet.store.base.StoreError` (a unique key taken is :class:`Conflict`);
  ``_read_long`` and ``_write_long`` for the few that may take long (a page of a listing, a purge);
- ``_is_open()``: whether it is between ``__aenter__`` and ``__aexit__``.

Each statement is one round trip. What takes two (a fenced write that changed nothing, then the look that
says why) needs no transaction: the second only explains the first. The dialect modules add their connection
handling and the coordination role (migrations, wake-ups, leadership).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any
from uuid import uuid4

from comfyfleet.domain import NewTask, QueueMetrics, Task, TaskPhase, TaskStatus
from comfyfleet.store._assets import AssetsMixin
from comfyfleet.store._common import (
    check_limit,
    decode_cursor,
    encode_cursor,
    fence_failure,
    load_migrations,
    not_cancellable,
    not_pending,
    pool_filter,
)
from comfyfleet.store._rows import Row, queue_order, task_from_row
from comfyfleet.store.base import Conflict, Lease, NotFound, StoreError, StoreUnavailable, TaskPage

logger = logging.getLogger("comfyfleet.store")

# /ready must answer quickly even when the database is gone.
READY_TIMEOUT_S = 2.0
# The seq block of ``pending_counts`` (migration 0008 divides seq by it): a position counts at most this many
# index entries, and sums one counter row per non-empty block ahead.
POSITION_BLOCK = 1024


class SqlStore(AssetsMixin):
    """The :class:`~comfyfleet.store.base.Store` roles over a dialect's statements (see the module's doc)."""

    def _task(self, row: Row) -> Task:
        return task_from_row(row, self.codec)

    def _tasks(self, rows: list[Row]) -> list[Task]:
        codec = self.codec
        return [task_from_row(row, codec) for row in rows]

    # -- schema -----------------------------------------------------------------------------------
    async def is_ready(self) -> bool:
        if not self._is_open():
            return False
        latest = max(migration.version for migration in load_migrations(self.sql.dialect))
        try:
            rows = await asyncio.wait_for(self._read(self.sql.schema_version, {}), READY_TIMEOUT_S)
        except (StoreError, TimeoutError):
            return False
        return bool(rows) and rows[0][0] is not None and rows[0][0] >= latest

    async def installation_id(self) -> str:
        rows = await self._read(self.sql.installation_id, {})
        if not rows:
            raise StoreUnavailable(
                "the store has no installation id (migration 0004): run 'comfyfleet migrate'"
            )
        return str(rows[0][0])

    # -- submission and reading -------------------------------------------------------------------
    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        dump_json = self.codec.dump_json
        params = {
            "tenant": new.tenant,
            "workflow_id": new.workflow_id,
            "priority": new.priority,
            "payload": dump_json(new.payload),
            "max_retries": new.max_retries,
            "timeout_s": new.timeout_s,
            "idempotency_key": new.idempotency_key,
            "pool": new.pool,
            "inputs": dump_json(new.inputs),
            "webhook": dump_json(new.webhook),
            "metadata": dump_json(new.metadata),
            "models": dump_json(new.models),
            **self._now(),
        }
        # Twice at most: an insert that lost a race to a concurrent submission with the same key finds that
        # submission's task, unless it was rolled back meanwhile; then this insert can win.
        for _ in range(3):
            task_id = new.id or str(uuid4())
            try:
                inserted = await self._write(self.sql.insert_task, {**params, "id": task_id})
            except Conflict as exc:
                # Only a caller-chosen id can collide (a minted uuid4 does not).
                raise Conflict(f"a task with id {task_id} already exists") from exc
            if inserted:
                seq, created_at = inserted[0]
                return self._new_task(new, task_id, seq, self.codec.load_time(created_at)), True
            existing = await self._read(self.sql.task_by_idempotency_key, params)
            if existing:
                return self._task(existing[0]), False
        raise StoreError(
            f"could not store task with idempotency key {new.idempotency_key!r}: keeps conflicting"
        )

    @staticmethod
    def _new_task(new: NewTask, task_id: str, seq: int, created_at: datetime) -> Task:
        return Task(
            id=task_id,
            seq=seq,
            workflow_id=new.workflow_id,
            priority=new.priority,
            status=TaskStatus.PENDING,
            payload=new.payload,
            created_at=created_at,
            updated_at=created_at,
            tenant=new.tenant,
            max_retries=new.max_retries,
            timeout_s=new.timeout_s,
            idempotency_key=new.idempotency_key,
            pool=new.pool,
            inputs=new.inputs,
            webhook=new.webhook,
            metadata=new.metadata,
            models=new.models,
        )

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task:
        rows = await self._read(self.sql.get_task, {"id": task_id, "tenant": tenant})
        if not rows:
            raise NotFound(f"task {task_id} not found")
        return self._task(rows[0])

    async def list_tasks(
        self,
        *,
        tenant: str | None = None,
        statuses: Collection[TaskStatus] | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        check_limit(limit)
        wanted = None if statuses is None else [TaskStatus(status).value for status in statuses]
        if wanted == []:
            return TaskPage([], None)
        filters = {
            "tenant": tenant,
            "statuses": None if wanted is None else self.codec.dump_list(wanted),
            "workflow_id": workflow_id,
            "before_seq": None if cursor is None else decode_cursor(cursor),
        }
        given = {name: value for name, value in filters.items() if value is not None}
        sql = self.sql.list_tasks(self.sql.list_filters[name] for name in given)
        rows = await self._read_long(sql, {**given, "limit": limit + 1})
        tasks = self._tasks(rows[:limit])
        next_cursor = encode_cursor(tasks[-1].seq) if len(rows) > limit else None
        return TaskPage(tasks, next_cursor)

    async def queue_position(self, task_id: str) -> int | None:
        # The runnable tasks a claim would take first, plus one. A pending task not due yet (a retry waiting
        # for not_before) gets the place it will have once due.
        rows = await self._read(self.sql.queue_position, {"id": task_id})
        if not rows or rows[0][0] != TaskStatus.PENDING:
            return None
        _, priority, seq = rows[0]
        block = seq // POSITION_BLOCK
        params = {"priority": priority, "seq": seq, "block": block, "block_start": block * POSITION_BLOCK}
        ahead = (await self._read(self.sql.tasks_ahead, {**params, **self._now()}))[0][0]
        return int(ahead) + 1

    async def queue_metrics(self, tenant: str | None = None) -> QueueMetrics:
        of_tenant = tenant is not None
        params = {"tenant": tenant, **self._now()}
        counts: dict[str, int] = {
            status: count
            for status, count in await self._read(self.sql.tasks_by_status(of_tenant=of_tenant), params)
        }
        oldest = await self._read(self.sql.oldest_pending_age(of_tenant=of_tenant), params)
        return QueueMetrics(
            pending_tasks=counts.get("pending", 0),
            running_tasks=counts.get("running", 0),
            completed_tasks=counts.get("completed", 0),
            failed_tasks=counts.get("failed", 0),
            cancelled_tasks=counts.get("cancelled", 0),
            oldest_pending_age_s=max(0.0, float(oldest[0][0])) if oldest else None,
        )

    async def demand_by_pool(self) -> dict[str | None, tuple[int, int]]:
        rows = await self._read(self.sql.demand_by_pool, self._now())
        return {
            pool: (int(runnable), int(running)) for pool, runnable, running in rows if runnable or running
        }

    async def count_by_status_and_priority(self) -> list[tuple[TaskStatus, int, int]]:
        rows = await self._read(self.sql.count_by_status_and_priority, {})
        return [(TaskStatus(status), priority, count) for status, priority, count in rows]

    # -- cancel and priority ----------------------------------------------------------------------
    async def cancel_task(self, task_id: str, tenant: str | None = None) -> Task:
        params = {"id": task_id, "tenant": tenant, **self._now()}
        rows = await self._write(self.sql.cancel_task, params)
        if rows:
            return self._task(rows[0])
        raise not_cancellable(task_id, await self._status_of(task_id, tenant))

    async def set_priority(self, task_id: str, priority: int, tenant: str | None = None) -> Task:
        params = {"id": task_id, "tenant": tenant, "priority": priority, **self._now()}
        rows = await self._write(self.sql.set_priority, params)
        if rows:
            return self._task(rows[0])
        raise not_pending(task_id, await self._status_of(task_id, tenant))

    async def task_status(self, task_id: str, tenant: str | None = None) -> TaskStatus | None:
        status = await self._status_of(task_id, tenant)
        return None if status is None else TaskStatus(status)

    async def _status_of(self, task_id: str, tenant: str | None) -> str | None:
        """A task's status as ``tenant`` sees it (None: unknown to that tenant)."""
        rows = await self._read(self.sql.task_status, {"id": task_id, "tenant": tenant})
        return str(rows[0][0]) if rows else None

    # -- the dispatcher's side --------------------------------------------------------------------
    async def peek_pending(self, *, limit: int, pools: Collection[str | None] | None = None) -> list[Task]:
        return await self._peek(self.sql.peek_pending, limit, pools, in_order=True)

    async def peek_pending_per_tenant(
        self, *, limit: int, pools: Collection[str | None] | None = None
    ) -> list[Task]:
        # Tenant by tenant from the database; merged into claim order here.
        return await self._peek(self.sql.peek_pending_per_tenant, limit, pools, in_order=False)

    async def _peek(
        self, sql: str, limit: int, pools: Collection[str | None] | None, *, in_order: bool
    ) -> list[Task]:
        in_pools = pool_filter(pools)
        if limit < 1 or in_pools is None:
            return []
        in_pools["pools"] = self.codec.dump_list(in_pools["pools"])
        params = {"limit": limit, **in_pools, **self._now()}
        # Every tenant's head is one lookup per tenant: with many tenants, a long read.
        rows = await (self._read if in_order else self._read_long)(sql, params)
        tasks = self._tasks(rows)
        return tasks if in_order else sorted(tasks, key=queue_order)

    async def running_per_tenant(self) -> dict[str, int]:
        rows = await self._read(self.sql.running_per_tenant, {})
        return {str(tenant): int(count) for tenant, count in rows}

    async def claim_ids(
        self,
        owner: str,
        lease_s: float,
        task_ids: Collection[str],
        assigned: Mapping[str, tuple[str, str]] | None = None,
    ) -> list[Task]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        params = {"ids": self.codec.dump_list(ids), "owner": owner, **self._lease(lease_s)}
        sql = self.sql.claim_ids
        if assigned:
            sql = self.sql.claim_assigned(len(assigned))
            for n, (task_id, (worker_id, prompt_id)) in enumerate(assigned.items()):
                params |= {
                    f"assigned_id_{n}": task_id,
                    f"assigned_worker_{n}": worker_id,
                    f"assigned_prompt_{n}": prompt_id,
                }
        # RETURNING gives no order guarantee; callers expect claim order.
        return sorted(self._tasks(await self._write(sql, params)), key=queue_order)

    async def renew_leases(self, owner: str, lease_s: float, task_ids: Collection[str]) -> int:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return 0
        params = {"ids": self.codec.dump_list(ids), "owner": owner, **self._lease(lease_s)}
        return len(await self._write(self.sql.renew_leases, params))

    async def _fenced(self, sql: str, lease: Lease, **params: Any) -> Task:
        """Run a write about the attempt ``lease`` names; :class:`StaleLease` (or :class:`NotFound`) when the
        lease is no longer current."""
        fence = {"task_id": lease.task_id, "attempt": lease.attempt, "owner": lease.owner, **self._now()}
        rows = await self._write(sql, {**fence, **params})
        if not rows:
            raise await self._fence_failure(lease)
        return self._task(rows[0])

    async def _fence_failure(self, lease: Lease) -> StoreError:
        rows = await self._read(self.sql.lease_holder, {"task_id": lease.task_id})
        return fence_failure(lease, rows[0] if rows else None)

    async def _fenced_unless_cancel_requested(self, sql: str, lease: Lease, **params: Any) -> Task:
        """Retry and release put a task back in the queue, unless its cancel was requested meanwhile: then
        it ends as cancelled instead of running again."""
        fence = {"task_id": lease.task_id, "attempt": lease.attempt, "owner": lease.owner}
        rows = await self._write(sql, {**fence, **params, **self._now()})
        if rows:
            return self._task(rows[0])
        flagged = await self._read(self.sql.cancel_requested, fence)
        if not (flagged and flagged[0][0]):
            raise await self._fence_failure(lease)
        return await self.finish_cancelled(lease)

    async def record_dispatch(self, lease: Lease, worker_id: str, prompt_id: str) -> Task:
        return await self._fenced(self.sql.record_dispatch, lease, worker_id=worker_id, prompt_id=prompt_id)

    async def set_phase(self, lease: Lease, phase: TaskPhase, progress: dict[str, Any] | None = None) -> Task:
        return await self._fenced(
            self.sql.set_phase, lease, phase=TaskPhase(phase).value, progress=self.codec.dump_json(progress)
        )

    async def set_progress(self, lease: Lease, progress: dict[str, Any]) -> None:
        fence = {"task_id": lease.task_id, "attempt": lease.attempt, "owner": lease.owner}
        params = {**fence, "progress": self.codec.dump_json(progress), **self._now()}
        if not await self._write(self.sql.set_progress, params):
            raise await self._fence_failure(lease)

    async def complete_task(
        self, lease: Lease, result: dict[str, Any], progress: dict[str, Any] | None = None
    ) -> Task:
        return await self._fenced(
            self.sql.complete_task,
            lease,
            result=self.codec.dump_json(result),
            progress=self.codec.dump_json(progress),
            outcome="completed",
            error=None,
            kind=None,
        )

    async def fail_task(
        self, lease: Lease, error: str, kind: str, details: dict[str, Any] | None = None
    ) -> Task:
        return await self._fenced(
            self.sql.fail_task,
            lease,
            outcome="failed",
            error=error,
            kind=kind,
            details=self.codec.dump_json(details),
        )

    async def retry_task(
        self,
        lease: Lease,
        not_before: datetime,
        error: str,
        kind: str,
        details: dict[str, Any] | None = None,
    ) -> Task:
        return await self._fenced_unless_cancel_requested(
            self.sql.retry_task,
            lease,
            not_before=self.codec.dump_time(not_before),
            outcome="retry",
            error=error,
            kind=kind,
            details=self.codec.dump_json(details),
        )

    async def release_task(self, lease: Lease) -> Task:
        return await self._fenced_unless_cancel_requested(self.sql.release_task, lease)

    async def finish_cancelled(self, lease: Lease, reason: str = "cancelled by request") -> Task:
        return await self._fenced(
            self.sql.finish_cancelled, lease, outcome="cancelled", error=reason, kind="cancelled"
        )

    async def adopt_expired(
        self, owner: str, lease_s: float, *, limit: int = 100, previous_owner: str | None = None
    ) -> list[Task]:
        if limit < 1:
            return []
        params = {"owner": owner, "previous_owner": previous_owner, "limit": limit, **self._lease(lease_s)}
        adopted = sorted(self._tasks(await self._write(self.sql.adopt_expired, params)), key=lambda t: t.seq)
        for task in adopted:
            logger.info("task_adopted task_id=%s attempt=%s owner=%s", task.id, task.attempt, owner)
        return adopted

    async def running_tasks(self, owner: str | None = None) -> list[Task]:
        return self._tasks(await self._read(self.sql.running_tasks, {"owner": owner}))

    async def next_due_at(self) -> datetime | None:
        rows = await self._read(self.sql.next_due_at, self._now())
        return self.codec.load_optional_time(rows[0][0])

    # -- idempotency keys held apart from tasks ---------------------------------------------------
    async def claim_idempotency_key(self, tenant: str, key: str, task_id: str, ttl_s: float) -> str | None:
        params = {"tenant": tenant, "key": key, "task_id": task_id, **self._lease(ttl_s)}
        for _ in range(3):
            if await self._write(self.sql.claim_idempotency_key, params):
                return None
            holder = await self._read(self.sql.idempotency_key_holder, params)
            if holder:
                return str(holder[0][0])
            # Released between the two statements: the key is free again, so claim it once more.
        raise StoreError(f"could not claim idempotency key {key!r}: keeps changing hands")

    async def release_idempotency_key(self, tenant: str, key: str, task_id: str) -> None:
        await self._write(
            self.sql.release_idempotency_key, {"tenant": tenant, "key": key, "task_id": task_id}
        )

    async def purge_idempotency_keys(self) -> int:
        return len(await self._write_long(self.sql.purge_idempotency_keys, self._now()))
