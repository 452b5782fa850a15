"""The shared store: PostgreSQL through an asyncpg pool, for one or several replicas.

Claims lock the next pending rows with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers in any number of
processes each get different tasks and none waits on another. Times come from the database clock, so the
replicas agree on when a lease expires however their own clocks drift.

Wake-ups cross replicas through ``LISTEN/NOTIFY`` on one channel: every notification is an envelope
``{"o": origin, "c": channel, "p": payload}``, so dynamic channel names (``task:<id>``) need no LISTEN
of their own. A notification reaches this replica's listeners at once and the other replicas through
PostgreSQL; one dedicated connection listens and reconnects when it drops (wake-ups sent while it is down
are missed: listeners keep a safety poll). Leadership is a session advisory lock held on another dedicated
connection, so it ends when the replica dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Collection
from datetime import datetime
from typing import Any, Self
from urllib.parse import urlsplit
from uuid import uuid4

import asyncpg

from comfyfleet.domain import (
    NewTask,
    QueueMetrics,
    Task,
    TaskPhase,
    TaskStatus,
    Worker,
    WorkerMetrics,
    WorkerState,
)
from comfyfleet.store._common import (
    TASK_COLUMNS,
    WORKER_COLUMNS,
    NotificationHub,
    Subscription,
    advisory_key,
    check_limit,
    decode_cursor,
    encode_cursor,
    listed_task_columns,
    load_migrations,
    not_pending,
    pending_tenants_sql,
    worker_metrics_from_counts,
)
from comfyfleet.store.base import (
    Conflict,
    InvalidArgument,
    Lease,
    NotFound,
    Notification,
    StaleLease,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    TaskPage,
    WebhookDelivery,
)

logger = logging.getLogger("comfyfleet.store.postgres")

NOTIFY_CHANNEL = "comfyfleet"
# PostgreSQL refuses NOTIFY payloads from 8000 bytes on; keep a margin for the envelope.
MAX_NOTIFY_BYTES = 7900
# How often the listening connection proves it is alive; a silently dropped socket is noticed this late.
LISTENER_PING_S = 5.0
MIGRATION_LOCK = advisory_key("store", "migrations")

# Claims and adoptions update ``seq = ANY(ARRAY(<locking sub-select>))`` rather than joining a CTE: with
# asyncpg's prepared statements PostgreSQL soon plans generically, cannot see the LIMIT, and would hash-join
# the whole table; a key array is always an index lookup.
_RUNNABLE = "status = 'pending' AND (not_before IS NULL OR not_before <= now())"
_FENCE = "id = $1 AND status = 'running' AND attempt = $2 AND lease_owner = $3"
# The finished attempt appended to ``attempts``; the row values are the old ones.
_APPEND_ATTEMPT = (
    "attempts = attempts || jsonb_build_array(jsonb_build_object("
    "'attempt', attempt, 'owner', lease_owner, 'worker_id', worker_id, 'prompt_id', prompt_id, "
    "'started_at', attempt_started_at, 'ended_at', now(), 'outcome', {outcome}::text, "
    "'error', {error}::text, 'kind', {kind}::text))"
)
_LEAVE_RUNNING = "phase = NULL, lease_owner = NULL, lease_expires_at = NULL"
WEBHOOK_COLUMNS = (
    "id, task_id, tenant, url, event, message_id, status, attempts, next_attempt_at, created_at, updated_at, "
    "delivered_at, last_status_code, last_error, history"
)
# A task's input files as lists show them: each without its base64 ``data``, with the decoded ``size``.
_DATA = "(spec->>'data')"
_INPUTS_SUMMARY = (
    "CASE WHEN tasks.inputs IS NULL THEN NULL ELSE (SELECT coalesce(jsonb_agg(CASE "
    "WHEN jsonb_typeof(spec->'data') = 'string' THEN (spec - 'data') || jsonb_build_object('size', "
    f"length({_DATA}) * 3 / 4 - (length({_DATA}) - length(rtrim({_DATA}, '=')))) "
    "ELSE spec END ORDER BY position), '[]'::jsonb) "
    "FROM jsonb_array_elements(tasks.inputs) WITH ORDINALITY AS element(spec, position)) END"
)
_LISTED_COLUMNS = listed_task_columns(_INPUTS_SUMMARY)

# sqlstate classes that mean "the database cannot serve us": connection exception, insufficient
# resources (too many connections), operator intervention (shutdown, starting up), authorization refused,
# no such database.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "28", "3D")
# /ready must answer quickly even when the server is gone.
READY_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 5.0
# InternalClientError: asyncpg's "another operation is in progress" on a connection the server just cut.
_DRIVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# "database is not accepting connections" (being dropped or restarted) is an outage, not a bad request.
_UNAVAILABLE_STATES = frozenset({"55000", "55006"})


def _task(record: asyncpg.Record) -> Task:
    phase = record["phase"]
    return Task(
        id=record["id"],
        seq=record["seq"],
        tenant=record["tenant"],
        workflow_id=record["workflow_id"],
        priority=record["priority"],
        status=TaskStatus(record["status"]),
        phase=TaskPhase(phase) if phase else None,
        # None: read by a list, which leaves the payload out.
        payload=record["payload"] if record["payload"] is not None else {},
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        worker_id=record["worker_id"],
        started_at=record["started_at"],
        completed_at=record["completed_at"],
        result=record["result"],
        error=record["error"],
        error_kind=record["error_kind"],
        error_details=record["error_details"],
        retry_count=record["retry_count"],
        max_retries=record["max_retries"],
        attempt=record["attempt"],
        prompt_id=record["prompt_id"],
        timeout_s=record["timeout_s"],
        not_before=record["not_before"],
        lease_owner=record["lease_owner"],
        lease_expires_at=record["lease_expires_at"],
        cancel_requested=record["cancel_requested"],
        idempotency_key=record["idempotency_key"],
        pool=record["pool"],
        inputs=record["inputs"],
        webhook=record["webhook"],
        metadata=record["metadata"],
        progress=record["progress"],
        attempts=record["attempts"],
    )


def _worker(record: asyncpg.Record) -> Worker:
    return Worker(
        id=record["id"],
        pool=record["pool"],
        provider=record["provider"],
        state=WorkerState(record["state"]),
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        endpoint=record["endpoint"],
        provider_id=record["provider_id"],
        current_task_ids=record["current_task_ids"],
        last_active_at=record["last_active_at"],
        health_failures=record["health_failures"],
        loaded_models=record["loaded_models"],
        node_types=record["node_types"],
        error=record["error"],
        labels=record["labels"],
        info=record["info"],
    )


def _delivery(record: asyncpg.Record) -> WebhookDelivery:
    return WebhookDelivery(
        id=record["id"],
        task_id=record["task_id"],
        tenant=record["tenant"],
        url=record["url"],
        event=record["event"],
        message_id=record["message_id"],
        status=record["status"],
        attempts=record["attempts"],
        next_attempt_at=record["next_attempt_at"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        delivered_at=record["delivered_at"],
        last_status_code=record["last_status_code"],
        last_error=record["last_error"],
        history=record["history"],
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresStore:
    """The :class:`~comfyfleet.store.base.Store` on PostgreSQL (``postgresql://user@host:port/db``)."""

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument(
                f"invalid PostgreSQL store URL {redact(url)!r}: use postgresql://user@host:port/db"
            )
        self.url = url
        self._where = redact(url)
        self._min_connections = min_connections
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._hub = NotificationHub()
        # Tells this replica's own notifications apart when PostgreSQL echoes them back.
        self._origin = uuid4().hex
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._leader_connection: asyncpg.Connection | None = None
        self._leader_lock = asyncio.Lock()
        self._leaderships: set[str] = set()
        self._state = "new"

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise StoreClosed("a store can be opened once; build a new one")
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_connections,
                max_size=self._max_connections,
                timeout=self._connect_timeout_s,
                init=_init_connection,
                server_settings=self._server_settings(),
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL at {self._where}: {_describe(exc)}") from exc
        self._state = "open"
        self._listener = asyncio.create_task(self._listen_forever(), name="comfyfleet-store-listener")
        try:
            # Open means listening: a notification sent after __aenter__ returns reaches listen().
            await asyncio.wait_for(self._listening.wait(), self._connect_timeout_s * 2)
        except TimeoutError as exc:
            await self.__aexit__(None, None, None)
            raise StoreUnavailable(f"cannot LISTEN on PostgreSQL at {self._where}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state != "open":
            return
        self._state = "closed"
        self._hub.close()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        async with self._leader_lock:
            await self._drop_leader_connection(lost=False)
        if self._pool is not None:
            try:
                # A graceful close waits for every borrowed connection; one stuck in a query must not hold
                # the shutdown of the whole process.
                await asyncio.wait_for(self._pool.close(), self._close_timeout_s)
            except TimeoutError:
                logger.warning("store_close_forced url=%s", self._where)
                self._pool.terminate()

    def _server_settings(self) -> dict[str, str]:
        return {"timezone": "UTC", "application_name": "comfyfleet"}

    def _translate(self, exc: BaseException) -> StoreError:
        if isinstance(exc, asyncpg.UndefinedTableError):
            return StoreUnavailable(
                f"the PostgreSQL store at {self._where} is not migrated: run 'comfyfleet migrate'"
            )
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if (
            isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError)
            or sqlstate[:2] in _UNAVAILABLE_CLASSES
            or sqlstate in _UNAVAILABLE_STATES
        ):
            return StoreUnavailable(f"PostgreSQL at {self._where} is unavailable: {_describe(exc)}")
        return StoreError(f"PostgreSQL at {self._where}: {_describe(exc)}")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._state != "open" or self._pool is None:
            raise StoreClosed(f"the PostgreSQL store is {self._state}; use it inside 'async with'")
        try:
            # No acquire timeout: waiting for a busy pool is back-pressure, not an outage; a dead server
            # still fails fast through the connect timeout of the pool's new connections.
            async with self._pool.acquire() as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise self._translate(exc) from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
            return row

    # -- schema ---------------------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        migrations = load_migrations("postgres")
        applied: list[int] = []
        async with self._connection() as conn, conn.transaction():
            # Replicas starting together: the first migrates, the others wait and find nothing to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied.append(migration.version)
        if applied:
            logger.info("store_migrated backend=postgres versions=%s", applied)
        return applied

    async def is_ready(self) -> bool:
        if self._state != "open":
            return False
        latest = max(migration.version for migration in load_migrations("postgres"))
        try:
            row = await asyncio.wait_for(
                self._fetchrow("SELECT max(version) AS version FROM schema_migrations"), READY_TIMEOUT_S
            )
        except (StoreError, TimeoutError):
            return False
        return row is not None and row["version"] is not None and row["version"] >= latest

    # -- submission and reading -----------------------------------------------------------------
    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        async with self._connection() as conn:
            # Twice at most: an insert that lost a race to a concurrent submission with the same key finds
            # that submission's task, unless it was rolled back meanwhile; then this insert can win.
            for _ in range(3):
                task_id = new.id or str(uuid4())
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO tasks (id, tenant, workflow_id, priority, status, payload, created_at, "
                        "updated_at, max_retries, timeout_s, idempotency_key, pool, inputs, webhook, metadata) "
                        "VALUES ($1, $2, $3, $4, 'pending', $5, now(), now(), $6, $7, $8, $9, $10, $11, $12) "
                        "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING "
                        "RETURNING seq, created_at",
                        task_id,
                        new.tenant,
                        new.workflow_id,
                        new.priority,
                        new.payload,
                        new.max_retries,
                        new.timeout_s,
                        new.idempotency_key,
                        new.pool,
                        new.inputs,
                        new.webhook,
                        new.metadata,
                    )
                except asyncpg.UniqueViolationError as exc:
                    # Only a caller-chosen id can collide (a minted uuid4 does not).
                    raise Conflict(f"a task with id {task_id} already exists") from exc
                if row is not None:
                    return Task(
                        id=task_id,
                        seq=row["seq"],
                        workflow_id=new.workflow_id,
                        priority=new.priority,
                        status=TaskStatus.PENDING,
                        payload=new.payload,
                        created_at=row["created_at"],
                        updated_at=row["created_at"],
                        tenant=new.tenant,
                        max_retries=new.max_retries,
                        timeout_s=new.timeout_s,
                        idempotency_key=new.idempotency_key,
                        pool=new.pool,
                        inputs=new.inputs,
                        webhook=new.webhook,
                        metadata=new.metadata,
                    ), True
                existing = await conn.fetchrow(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE tenant = $1 AND idempotency_key = $2",
                    new.tenant,
                    new.idempotency_key,
                )
                if existing is not None:
                    return _task(existing), False
        raise StoreError(
            f"could not store task with idempotency key {new.idempotency_key!r}: keeps conflicting"
        )

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task:
        row = await self._fetchrow(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
            task_id,
            tenant,
        )
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return _task(row)

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
        clauses: list[str] = []
        args: list[Any] = []

        def bind(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if tenant is not None:
            clauses.append(f"tenant = {bind(tenant)}")
        if statuses is not None:
            wanted = [TaskStatus(status).value for status in statuses]
            if not wanted:
                return TaskPage([], None)
            clauses.append(f"status = ANY({bind(wanted)}::text[])")
        if workflow_id is not None:
            clauses.append(f"workflow_id = {bind(workflow_id)}")
        if cursor is not None:
            clauses.append(f"seq < {bind(decode_cursor(cursor))}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetch(
            f"SELECT {_LISTED_COLUMNS} FROM tasks {where} ORDER BY seq DESC LIMIT {bind(limit + 1)}", *args
        )
        tasks = [_task(row) for row in rows[:limit]]
        next_cursor = encode_cursor(tasks[-1].seq) if len(rows) > limit else None
        return TaskPage(tasks, next_cursor)

    async def queue_position(self, task_id: str) -> int | None:
        # The runnable tasks a claim would take first, plus one. A pending task not due yet (a retry
        # waiting for not_before) gets the place it will have once due.
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT status, priority, seq FROM tasks WHERE id = $1", task_id)
            if row is None or row["status"] != TaskStatus.PENDING:
                return None
            # Two plain counts with known bounds: a count correlated with the outer row gets planned
            # blind and scans the table twice.
            ahead = await conn.fetchval(
                f"SELECT (SELECT count(*) FROM tasks WHERE {_RUNNABLE} AND priority > $1) + "
                f"(SELECT count(*) FROM tasks WHERE {_RUNNABLE} AND priority = $1 AND seq < $2)",
                row["priority"],
                row["seq"],
            )
        return int(ahead) + 1

    async def queue_metrics(self, tenant: str | None = None) -> QueueMetrics:
        async with self._connection() as conn:
            counts = await conn.fetch(
                "SELECT status, count(*) AS n FROM tasks WHERE $1::text IS NULL OR tenant = $1 GROUP BY status",
                tenant,
            )
            age = await conn.fetchval(
                "SELECT extract(epoch FROM now() - created_at) FROM tasks "
                "WHERE status = 'pending' AND ($1::text IS NULL OR tenant = $1) ORDER BY seq LIMIT 1",
                tenant,
            )
        by_status = {row["status"]: row["n"] for row in counts}
        return QueueMetrics(
            pending_tasks=by_status.get("pending", 0),
            running_tasks=by_status.get("running", 0),
            completed_tasks=by_status.get("completed", 0),
            failed_tasks=by_status.get("failed", 0),
            cancelled_tasks=by_status.get("cancelled", 0),
            oldest_pending_age_s=None if age is None else max(0.0, float(age)),
        )

    async def demand_by_pool(self) -> dict[str | None, tuple[int, int]]:
        rows = await self._fetch(
            f"SELECT pool, count(*) FILTER (WHERE {_RUNNABLE}) AS runnable, "
            "count(*) FILTER (WHERE status = 'running') AS running "
            "FROM tasks WHERE status IN ('pending', 'running') GROUP BY pool"
        )
        return {
            row["pool"]: (row["runnable"], row["running"])
            for row in rows
            if row["runnable"] or row["running"]
        }

    async def count_by_status_and_priority(self) -> list[tuple[TaskStatus, int, int]]:
        rows = await self._fetch(
            "SELECT status, priority, count(*) AS n FROM tasks GROUP BY status, priority ORDER BY status, priority"
        )
        return [(TaskStatus(row["status"]), row["priority"], row["n"]) for row in rows]

    # -- cancel ---------------------------------------------------------------------------------
    async def cancel_task(self, task_id: str, tenant: str | None = None) -> Task:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE tasks SET "
                "cancel_requested = (status = 'running') OR cancel_requested, "
                "completed_at = CASE WHEN status = 'pending' THEN now() ELSE completed_at END, "
                "error = CASE WHEN status = 'pending' THEN 'cancelled by request' ELSE error END, "
                "error_kind = CASE WHEN status = 'pending' THEN 'cancelled' ELSE error_kind END, "
                "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END, "
                "updated_at = now() "
                "WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND status IN ('pending', 'running') "
                f"RETURNING {TASK_COLUMNS}",
                task_id,
                tenant,
            )
            if row is not None:
                return _task(row)
            status = await conn.fetchval(
                "SELECT status FROM tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
                task_id,
                tenant,
            )
        if status is None:
            raise NotFound(f"task {task_id} not found")
        raise Conflict(f"task {task_id} is already {status}")

    async def set_priority(self, task_id: str, priority: int, tenant: str | None = None) -> Task:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE tasks SET priority = $3, updated_at = now() "
                f"WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND status = 'pending' RETURNING {TASK_COLUMNS}",
                task_id,
                tenant,
                priority,
            )
            if row is not None:
                return _task(row)
            status = await conn.fetchval(
                "SELECT status FROM tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
                task_id,
                tenant,
            )
        raise not_pending(task_id, status)

    # -- the dispatcher's side ------------------------------------------------------------------
    async def claim(
        self,
        owner: str,
        lease_s: float,
        *,
        limit: int = 1,
        pools: Collection[str | None] | None = None,
    ) -> list[Task]:
        args: list[Any] = [owner, float(lease_s), limit]
        pool_clause = _pool_filter(pools, args)
        if limit < 1 or pool_clause is None:
            return []
        # SKIP LOCKED: rows another claimer is taking right now are passed over, not waited for; the
        # LIMIT then takes the next ones, so concurrent claimers share the queue head without blocking.
        return await self._claim_picked(
            f"SELECT seq FROM tasks WHERE {_RUNNABLE}{pool_clause} "
            "ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED",
            args,
        )

    async def claim_ids(self, owner: str, lease_s: float, task_ids: Collection[str]) -> list[Task]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        return await self._claim_picked(
            f"SELECT seq FROM tasks WHERE id = ANY($3::text[]) AND {_RUNNABLE} FOR UPDATE SKIP LOCKED",
            [owner, float(lease_s), ids],
        )

    async def _claim_picked(self, picked: str, args: list[Any]) -> list[Task]:
        """Claim the rows ``picked`` selects and locks; ``$1`` is the owner and ``$2`` the lease."""
        rows = await self._fetch(
            "UPDATE tasks SET status = 'running', phase = 'dispatching', attempt = attempt + 1, "
            "started_at = coalesce(started_at, now()), attempt_started_at = now(), lease_owner = $1, "
            "lease_expires_at = now() + make_interval(secs => $2), worker_id = NULL, prompt_id = NULL, "
            f"progress = NULL, updated_at = now() WHERE seq = ANY(ARRAY({picked})) RETURNING {TASK_COLUMNS}",
            *args,
        )
        tasks = [_task(row) for row in rows]
        tasks.sort(key=lambda task: (-task.priority, task.seq))
        return tasks

    async def peek_pending(self, *, limit: int, pools: Collection[str | None] | None = None) -> list[Task]:
        args: list[Any] = [limit]
        pool_clause = _pool_filter(pools, args)
        if limit < 1 or pool_clause is None:
            return []
        rows = await self._fetch(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {_RUNNABLE}{pool_clause} ORDER BY priority DESC, seq LIMIT $1",
            *args,
        )
        return [_task(row) for row in rows]

    async def peek_pending_per_tenant(
        self, *, limit: int, pools: Collection[str | None] | None = None
    ) -> list[Task]:
        args: list[Any] = [limit]
        pool_clause = _pool_filter(pools, args)
        if limit < 1 or pool_clause is None:
            return []
        rows = await self._fetch(
            f"SELECT head.* FROM ({pending_tenants_sql()}) AS pending_tenants CROSS JOIN LATERAL ("
            f" SELECT {TASK_COLUMNS} FROM tasks WHERE tenant = pending_tenants.name AND {_RUNNABLE}{pool_clause}"
            " ORDER BY priority DESC, seq LIMIT $1) AS head ORDER BY head.priority DESC, head.seq",
            *args,
        )
        return [_task(row) for row in rows]

    async def running_per_tenant(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT tenant, count(*) AS running FROM tasks WHERE status = 'running' GROUP BY tenant"
        )
        return {str(row["tenant"]): int(row["running"]) for row in rows}

    async def _fence_failure(self, conn: asyncpg.Connection, lease: Lease) -> StoreError:
        row = await conn.fetchrow(
            "SELECT status, attempt, lease_owner FROM tasks WHERE id = $1", lease.task_id
        )
        if row is None:
            return NotFound(f"task {lease.task_id} not found")
        return StaleLease(
            f"task {lease.task_id}: lease attempt={lease.attempt} owner={lease.owner} is stale "
            f"(task is {row['status']}, attempt={row['attempt']}, owner={row['lease_owner']})"
        )

    async def _fenced(self, lease: Lease, assignments: str, *args: Any) -> Task:
        """``UPDATE`` one running attempt if ``lease`` is still current, else :class:`StaleLease`.
        ``assignments`` numbers its own parameters from ``$4``."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"UPDATE tasks SET {assignments}, updated_at = now() WHERE {_FENCE} RETURNING {TASK_COLUMNS}",
                lease.task_id,
                lease.attempt,
                lease.owner,
                *args,
            )
            if row is None:
                raise await self._fence_failure(conn, lease)
        return _task(row)

    async def record_dispatch(self, lease: Lease, worker_id: str, prompt_id: str) -> Task:
        return await self._fenced(lease, "worker_id = $4, prompt_id = $5", worker_id, prompt_id)

    async def set_phase(self, lease: Lease, phase: TaskPhase, progress: dict[str, Any] | None = None) -> Task:
        return await self._fenced(
            lease, "phase = $4, progress = coalesce($5::jsonb, progress)", TaskPhase(phase).value, progress
        )

    async def set_progress(self, lease: Lease, progress: dict[str, Any]) -> None:
        async with self._connection() as conn:
            seq = await conn.fetchval(
                f"UPDATE tasks SET progress = $4, updated_at = now() WHERE {_FENCE} RETURNING seq",
                lease.task_id,
                lease.attempt,
                lease.owner,
                progress,
            )
            if seq is None:
                raise await self._fence_failure(conn, lease)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $2) "
                "WHERE status = 'running' AND lease_owner = $1",
                owner,
                float(lease_s),
            )
        return int(status.rsplit(" ", 1)[1])

    async def complete_task(self, lease: Lease, result: dict[str, Any]) -> Task:
        append = _APPEND_ATTEMPT.format(outcome="'completed'", error="NULL", kind="NULL")
        return await self._fenced(
            lease,
            "status = 'completed', result = $4, completed_at = now(), error = NULL, error_kind = NULL, "
            f"error_details = NULL, {_LEAVE_RUNNING}, {append}",
            result,
        )

    async def fail_task(
        self, lease: Lease, error: str, kind: str, details: dict[str, Any] | None = None
    ) -> Task:
        append = _APPEND_ATTEMPT.format(outcome="'failed'", error="$4", kind="$5")
        return await self._fenced(
            lease,
            "status = 'failed', error = $4, error_kind = $5, error_details = $6, completed_at = now(), "
            f"{_LEAVE_RUNNING}, {append}",
            error,
            kind,
            details,
        )

    async def retry_task(
        self,
        lease: Lease,
        not_before: datetime,
        error: str,
        kind: str,
        details: dict[str, Any] | None = None,
    ) -> Task:
        append = _APPEND_ATTEMPT.format(outcome="'retry'", error="$5", kind="$6")
        return await self._fenced_unless_cancelled(
            lease,
            "status = 'pending', retry_count = retry_count + 1, not_before = $4, error = $5, error_kind = $6, "
            "error_details = $7, worker_id = NULL, prompt_id = NULL, attempt_started_at = NULL, progress = NULL, "
            f"{_LEAVE_RUNNING}, {append}",
            not_before,
            error,
            kind,
            details,
        )

    async def release_task(self, lease: Lease) -> Task:
        # An attempt given back never ran, so it is not recorded; started_at goes back to unset if no
        # attempt ever ran.
        return await self._fenced_unless_cancelled(
            lease,
            "status = 'pending', worker_id = NULL, prompt_id = NULL, attempt_started_at = NULL, progress = NULL, "
            "started_at = CASE WHEN jsonb_array_length(attempts) = 0 THEN NULL ELSE started_at END, "
            f"{_LEAVE_RUNNING}",
        )

    async def _fenced_unless_cancelled(self, lease: Lease, assignments: str, *args: Any) -> Task:
        """Retry and release put a task back in the queue, unless its cancel was requested meanwhile:
        then it ends as cancelled instead of running again."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"UPDATE tasks SET {assignments}, updated_at = now() WHERE {_FENCE} AND NOT cancel_requested "
                f"RETURNING {TASK_COLUMNS}",
                lease.task_id,
                lease.attempt,
                lease.owner,
                *args,
            )
            if row is not None:
                return _task(row)
            cancel_requested = await conn.fetchval(
                f"SELECT cancel_requested FROM tasks WHERE {_FENCE}",
                lease.task_id,
                lease.attempt,
                lease.owner,
            )
            if not cancel_requested:
                raise await self._fence_failure(conn, lease)
        return await self.finish_cancelled(lease)

    async def finish_cancelled(self, lease: Lease, reason: str = "cancelled by request") -> Task:
        append = _APPEND_ATTEMPT.format(outcome="'cancelled'", error="$4", kind="'cancelled'")
        return await self._fenced(
            lease,
            f"status = 'cancelled', error = $4, error_kind = 'cancelled', completed_at = now(), "
            f"{_LEAVE_RUNNING}, {append}",
            reason,
        )

    async def adopt_expired(
        self, owner: str, lease_s: float, *, limit: int = 100, previous_owner: str | None = None
    ) -> list[Task]:
        if limit < 1:
            return []
        rows = await self._fetch(
            "UPDATE tasks SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2), "
            "attempt = attempt + 1, updated_at = now() WHERE seq = ANY(ARRAY("
            "SELECT seq FROM tasks WHERE status = 'running' AND (lease_expires_at <= now() OR lease_owner = $4) "
            f"ORDER BY lease_expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)) RETURNING {TASK_COLUMNS}",
            owner,
            float(lease_s),
            limit,
            previous_owner,
        )
        adopted = sorted((_task(row) for row in rows), key=lambda task: task.seq)
        for task in adopted:
            logger.info("task_adopted task_id=%s attempt=%s owner=%s", task.id, task.attempt, owner)
        return adopted

    async def running_tasks(self, owner: str | None = None) -> list[Task]:
        rows = await self._fetch(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'running' AND ($1::text IS NULL OR lease_owner = $1) "
            "ORDER BY seq",
            owner,
        )
        return [_task(row) for row in rows]

    async def next_due_at(self) -> datetime | None:
        async with self._connection() as conn:
            due: datetime | None = await conn.fetchval(
                "SELECT min(not_before) FROM tasks WHERE status = 'pending' AND not_before IS NOT NULL "
                "AND not_before > now()"
            )
        return due

    # -- workers --------------------------------------------------------------------------------
    async def upsert_worker(self, worker: Worker) -> Worker:
        # created_at is the first record's: a worker is created once, however often it is updated.
        row = await self._fetchrow(
            f"INSERT INTO workers ({WORKER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14, $15) "
            "ON CONFLICT (id) DO UPDATE SET pool = excluded.pool, provider = excluded.provider, "
            "state = excluded.state, updated_at = excluded.updated_at, endpoint = excluded.endpoint, "
            "provider_id = excluded.provider_id, current_task_ids = excluded.current_task_ids, "
            "last_active_at = excluded.last_active_at, health_failures = excluded.health_failures, "
            "loaded_models = excluded.loaded_models, node_types = excluded.node_types, error = excluded.error, "
            f"labels = excluded.labels, info = excluded.info RETURNING {WORKER_COLUMNS}",
            worker.id,
            worker.pool,
            worker.provider,
            WorkerState(worker.state).value,
            worker.created_at,
            worker.endpoint,
            worker.provider_id,
            list(worker.current_task_ids),
            worker.last_active_at,
            worker.health_failures,
            list(worker.loaded_models),
            worker.node_types,
            worker.error,
            dict(worker.labels),
            dict(worker.info),
        )
        assert row is not None
        return _worker(row)

    async def get_worker(self, worker_id: str) -> Worker:
        row = await self._fetchrow(f"SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1", worker_id)
        if row is None:
            raise NotFound(f"worker {worker_id} not found")
        return _worker(row)

    async def list_workers(self, *, pool: str | None = None, include_gone: bool = False) -> list[Worker]:
        rows = await self._fetch(
            f"SELECT {WORKER_COLUMNS} FROM workers WHERE ($1::text IS NULL OR pool = $1) "
            "AND ($2 OR state != 'terminated') ORDER BY created_at, id",
            pool,
            include_gone,
        )
        return [_worker(row) for row in rows]

    async def delete_worker(self, worker_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute("DELETE FROM workers WHERE id = $1", worker_id)

    async def worker_metrics(self) -> WorkerMetrics:
        rows = await self._fetch("SELECT state, count(*) AS n FROM workers GROUP BY state")
        return worker_metrics_from_counts({row["state"]: row["n"] for row in rows})

    # -- webhook outbox -------------------------------------------------------------------------
    async def claim_webhook_deliveries(
        self, owner: str, lease_s: float, *, limit: int = 20
    ) -> list[WebhookDelivery]:
        if limit < 1:
            return []
        rows = await self._fetch(
            "UPDATE webhook_deliveries SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2), "
            "updated_at = now() WHERE id = ANY(ARRAY(SELECT id FROM webhook_deliveries WHERE status = 'pending' "
            "AND next_attempt_at <= now() AND (lease_expires_at IS NULL OR lease_expires_at <= now()) "
            "ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)) "
            f"RETURNING {WEBHOOK_COLUMNS}",
            owner,
            float(lease_s),
            limit,
        )
        return sorted(
            (_delivery(row) for row in rows), key=lambda delivery: (delivery.next_attempt_at, delivery.id)
        )

    async def record_webhook_attempt(
        self,
        delivery_id: int,
        owner: str,
        *,
        outcome: str,
        status_code: int | None,
        error: str | None,
        duration_s: float,
        next_attempt_at: datetime | None = None,
    ) -> WebhookDelivery:
        if outcome not in ("delivered", "retry", "failed"):
            raise InvalidArgument(
                f"webhook attempt outcome must be delivered, retry or failed, got {outcome!r}"
            )
        status = {"delivered": "delivered", "retry": "pending", "failed": "failed"}[outcome]
        row = await self._fetchrow(
            "UPDATE webhook_deliveries SET status = $3, attempts = attempts + 1, "
            "next_attempt_at = coalesce($4, next_attempt_at), lease_owner = NULL, lease_expires_at = NULL, "
            "updated_at = now(), delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END, "
            "last_status_code = $5, last_error = $6, history = history || jsonb_build_array(jsonb_build_object("
            "'attempt', attempts + 1, 'at', now(), 'status_code', $5::int, 'error', $6::text, "
            "'duration_ms', $7::float8)) "
            f"WHERE id = $1 AND lease_owner = $2 AND status = 'pending' RETURNING {WEBHOOK_COLUMNS}",
            delivery_id,
            owner,
            status,
            next_attempt_at,
            status_code,
            error,
            round(duration_s * 1000, 1),
        )
        if row is None:
            raise StaleLease(f"webhook delivery {delivery_id} is not leased to {owner} (or already finished)")
        return _delivery(row)

    async def webhook_deliveries(self, task_id: str) -> list[WebhookDelivery]:
        rows = await self._fetch(
            f"SELECT {WEBHOOK_COLUMNS} FROM webhook_deliveries WHERE task_id = $1 ORDER BY id", task_id
        )
        return [_delivery(row) for row in rows]

    async def next_webhook_due_at(self) -> datetime | None:
        async with self._connection() as conn:
            due: datetime | None = await conn.fetchval(
                "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"
            )
        return due

    # -- coordination ---------------------------------------------------------------------------
    async def notify(self, channel: str, payload: str = "") -> None:
        envelope = json.dumps({"o": self._origin, "c": channel, "p": payload}, separators=(",", ":"))
        if len(envelope.encode()) > MAX_NOTIFY_BYTES:
            raise InvalidArgument(
                f"notification on {channel!r} is too large ({len(envelope.encode())} bytes, at most "
                f"{MAX_NOTIFY_BYTES}): send an id and let listeners read the rest from the store"
            )
        async with self._connection() as conn:
            self._hub.publish(Notification(channel, payload))
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, envelope)

    def listen(self) -> Subscription:
        if self._state != "open":
            raise StoreClosed(f"the PostgreSQL store is {self._state}; use it inside 'async with'")
        return self._hub.subscribe()

    def _on_notification(self, connection: object, pid: int, channel: str, payload: str) -> None:
        try:
            envelope = json.loads(payload)
            origin, name, body = envelope["o"], envelope["c"], envelope["p"]
        except (ValueError, KeyError, TypeError):
            logger.warning("notification_malformed payload=%r", payload[:200])
            return
        if origin != self._origin:  # our own were delivered when sent
            self._hub.publish(Notification(str(name), str(body)))

    async def _listen_forever(self) -> None:
        """Keep one connection LISTENing; reconnect with backoff when it drops. Ends only when cancelled."""
        backoff_s = 0.1
        while True:
            try:
                conn = await asyncpg.connect(
                    self.url, timeout=self._connect_timeout_s, server_settings=self._server_settings()
                )
            except _DRIVER_ERRORS as exc:
                logger.warning("store_listener_connect_failed url=%s error=%s", self._where, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            try:
                await self._listen_on(conn)
                logger.warning("store_listener_lost url=%s error=connection closed", self._where)
            except Exception as exc:  # whatever broke, the cure is a fresh connection
                logger.warning("store_listener_lost url=%s error=%s", self._where, exc)
            finally:
                self._listening.clear()
                conn.terminate()

    async def _listen_on(self, conn: asyncpg.Connection) -> None:
        """Deliver notifications from ``conn`` until it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _connection: lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notification)
        self._listening.set()
        while not lost.is_set():
            # asyncpg notices a dead socket only when it uses it: a ping turns a silent drop into a reconnect.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTENER_PING_S)
                return
            await conn.execute("SELECT 1", timeout=LISTENER_PING_S)

    async def try_leader(self, name: str) -> bool:
        """Hold a session advisory lock per name on a dedicated connection; a lost connection loses every
        leadership (and PostgreSQL frees the locks of a dead session, so another replica can take over)."""
        if self._state != "open":
            raise StoreClosed(f"the PostgreSQL store is {self._state}; use it inside 'async with'")
        async with self._leader_lock:
            try:
                conn = self._leader_connection
                if conn is None or conn.is_closed():
                    await self._drop_leader_connection(lost=True)
                    conn = self._leader_connection = await asyncpg.connect(
                        self.url, timeout=self._connect_timeout_s, server_settings=self._server_settings()
                    )
                if name in self._leaderships:
                    # Session locks stay while the session lives: proving the session alive is enough.
                    await conn.fetchval("SELECT 1", timeout=self._connect_timeout_s)
                    return True
                # Session advisory locks nest; ask only for names not held yet.
                acquired = bool(
                    await conn.fetchval(
                        "SELECT pg_try_advisory_lock($1)",
                        advisory_key("leader", name),
                        timeout=self._connect_timeout_s,
                    )
                )
            except _DRIVER_ERRORS as exc:
                logger.warning("leadership_check_failed name=%s error=%s", name, exc)
                await self._drop_leader_connection(lost=True)
                return False
            if acquired:
                self._leaderships.add(name)
                logger.info("leadership_acquired name=%s", name)
            return acquired

    async def installation_id(self) -> str:
        row = await self._fetchrow("SELECT id FROM installation")
        if row is None:
            raise StoreUnavailable(
                f"the PostgreSQL store at {self._where} has no installation id: run 'comfyfleet migrate'"
            )
        return str(row["id"])

    async def _drop_leader_connection(self, *, lost: bool) -> None:
        if self._leaderships:
            if lost:
                logger.warning("leadership_lost names=%s", sorted(self._leaderships))
            else:
                logger.info("leadership_released names=%s", sorted(self._leaderships))
        self._leaderships.clear()
        conn, self._leader_connection = self._leader_connection, None
        if conn is None or conn.is_closed():
            return
        if not lost:
            # The server frees a closed session's locks only once it notices the disconnect; unlocking first
            # hands leadership over the moment this replica leaves.
            try:
                await conn.execute("SELECT pg_advisory_unlock_all()", timeout=self._connect_timeout_s)
                await conn.close(timeout=self._connect_timeout_s)
                return
            except _DRIVER_ERRORS as exc:
                logger.warning("leadership_release_failed error=%s", exc)
        conn.terminate()


def _pool_filter(pools: Collection[str | None] | None, args: list[Any]) -> str | None:
    """The ``AND …`` clause restricting to ``pools`` (binding its parameter into ``args``); ``None`` when
    nothing can match."""
    if pools is None:
        return ""
    named = sorted({pool for pool in pools if pool is not None})
    parts = []
    if named:
        args.append(named)
        parts.append(f"pool = ANY(${len(args)}::text[])")
    if None in pools:
        parts.append("pool IS NULL")
    if not parts:
        return None
    return f" AND ({' OR '.join(parts)})"
