"""The embedded store: one SQLite file in WAL mode, for a single replica.

Every write goes through one connection owned by one thread, so writes never contend for SQLite's lock.
That thread commits in groups: all the writes queued while the previous commit ran are applied in one
transaction (each inside a savepoint, so one failing write does not undo its neighbours) and answered
together once the commit is done. A caller is answered only after its write is committed, so nothing a
caller was told is stored can be lost when the process dies. Reads use a second connection in a second
thread and never wait for the writer.

Claims are ``UPDATE … RETURNING`` over the partial index of pending tasks; with a single writer they
cannot race. Notifications are delivered in-process and ``try_leader`` is always True: one replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Self, TypeVar
from uuid import uuid4

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
    check_limit,
    decode_cursor,
    encode_cursor,
    listed_task_columns,
    load_migrations,
    not_pending,
    pending_tenants_sql,
    utcnow,
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

logger = logging.getLogger("comfyfleet.store.sqlite")

T = TypeVar("T")

# Enough to amortise one commit over a burst, small enough that one group never holds the lock for long.
MAX_GROUP = 512


# Runnable = pending and due. Used by claim, queue_position and demand so the three agree exactly.
_RUNNABLE = "status = 'pending' AND (not_before IS NULL OR not_before <= ?)"
# Without statistics the planner may prefer tasks_status_seq and sort every pending task; name the index.
_PENDING = "tasks INDEXED BY tasks_pending_order"
_PENDING_TENANTS = pending_tenants_sql("tasks INDEXED BY tasks_pending_tenant")
_FENCE = "id = ? AND status = 'running' AND attempt = ? AND lease_owner = ?"
# The finished attempt as one JSON object appended to ``attempts``; the values are the row's old ones.
_APPEND_ATTEMPT = (
    "attempts = json_insert(attempts, '$[#]', json_object("
    "'attempt', attempt, 'owner', lease_owner, 'worker_id', worker_id, 'prompt_id', prompt_id, "
    "'started_at', attempt_started_at, 'ended_at', ?, 'outcome', ?, 'error', ?, 'kind', ?))"
)
_LEAVE_RUNNING = "phase = NULL, lease_owner = NULL, lease_expires_at = NULL"
WEBHOOK_COLUMNS = (
    "id, task_id, tenant, url, event, message_id, status, attempts, next_attempt_at, created_at, updated_at, "
    "delivered_at, last_status_code, last_error, history"
)
# A task's input files as lists show them: each without its base64 ``data``, with the decoded ``size``.
_DATA = "json_extract(spec.value, '$.data')"
_INPUTS_SUMMARY = (
    "CASE WHEN tasks.inputs IS NULL THEN NULL ELSE (SELECT json_group_array(CASE "
    f"WHEN json_type(spec.value, '$.data') = 'text' THEN json_set(json_remove(spec.value, '$.data'), '$.size', "
    f"length({_DATA}) * 3 / 4 - (length({_DATA}) - length(rtrim({_DATA}, '=')))) "
    "ELSE json(spec.value) END) FROM json_each(tasks.inputs) AS spec) END"
)
_LISTED_COLUMNS = listed_task_columns(_INPUTS_SUMMARY)


def _ts(moment: datetime) -> str:
    # Fixed width and always UTC, so comparing the text compares the times.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _task(row: tuple[Any, ...]) -> Task:
    (
        id_,
        seq,
        tenant,
        workflow_id,
        priority,
        status,
        phase,
        payload,
        created_at,
        updated_at,
        worker_id,
        started_at,
        completed_at,
        result,
        error,
        error_kind,
        error_details,
        retry_count,
        max_retries,
        attempt,
        prompt_id,
        timeout_s,
        not_before,
        lease_owner,
        lease_expires_at,
        cancel_requested,
        idempotency_key,
        pool,
        inputs,
        webhook,
        metadata,
        progress,
        attempts,
    ) = row
    return Task(
        id=id_,
        seq=seq,
        tenant=tenant,
        workflow_id=workflow_id,
        priority=priority,
        status=TaskStatus(status),
        phase=TaskPhase(phase) if phase else None,
        # None: read by a list, which leaves the payload out.
        payload=json.loads(payload) if payload is not None else {},
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
        worker_id=worker_id,
        started_at=_dt(started_at),
        completed_at=_dt(completed_at),
        result=_loads(result),
        error=error,
        error_kind=error_kind,
        error_details=_loads(error_details),
        retry_count=retry_count,
        max_retries=max_retries,
        attempt=attempt,
        prompt_id=prompt_id,
        timeout_s=timeout_s,
        not_before=_dt(not_before),
        lease_owner=lease_owner,
        lease_expires_at=_dt(lease_expires_at),
        cancel_requested=bool(cancel_requested),
        idempotency_key=idempotency_key,
        pool=pool,
        inputs=_loads(inputs),
        webhook=_loads(webhook),
        metadata=_loads(metadata),
        progress=_loads(progress),
        attempts=json.loads(attempts),
    )


def _worker(row: tuple[Any, ...]) -> Worker:
    (
        id_,
        pool,
        provider,
        state,
        created_at,
        updated_at,
        endpoint,
        provider_id,
        current_task_ids,
        last_active_at,
        health_failures,
        loaded_models,
        node_types,
        error,
        labels,
        info,
    ) = row
    return Worker(
        id=id_,
        pool=pool,
        provider=provider,
        state=WorkerState(state),
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
        endpoint=endpoint,
        provider_id=provider_id,
        current_task_ids=json.loads(current_task_ids),
        last_active_at=_dt(last_active_at),
        health_failures=health_failures,
        loaded_models=json.loads(loaded_models),
        node_types=_loads(node_types),
        error=error,
        labels=json.loads(labels),
        info=json.loads(info),
    )


def _delivery(row: tuple[Any, ...]) -> WebhookDelivery:
    (
        id_,
        task_id,
        tenant,
        url,
        event,
        message_id,
        status,
        attempts,
        next_attempt_at,
        created_at,
        updated_at,
        delivered_at,
        last_status_code,
        last_error,
        history,
    ) = row
    return WebhookDelivery(
        id=id_,
        task_id=task_id,
        tenant=tenant,
        url=url,
        event=event,
        message_id=message_id,
        status=status,
        attempts=attempts,
        next_attempt_at=datetime.fromisoformat(next_attempt_at),
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
        delivered_at=_dt(delivered_at),
        last_status_code=last_status_code,
        last_error=last_error,
        history=json.loads(history),
    )


def _fence_failure(conn: sqlite3.Connection, lease: Lease) -> StoreError:
    row = conn.execute(
        "SELECT status, attempt, lease_owner FROM tasks WHERE id = ?", (lease.task_id,)
    ).fetchone()
    if row is None:
        return NotFound(f"task {lease.task_id} not found")
    status, attempt, owner = row
    return StaleLease(
        f"task {lease.task_id}: lease attempt={lease.attempt} owner={lease.owner} is stale "
        f"(task is {status}, attempt={attempt}, owner={owner})"
    )


def _cancel_pending_for(conn: sqlite3.Connection, lease: Lease) -> bool:
    """Whether the fenced write failed only because a cancel was requested meanwhile."""
    row = conn.execute(
        f"SELECT cancel_requested FROM tasks WHERE {_FENCE}", (lease.task_id, lease.attempt, lease.owner)
    ).fetchone()
    return row is not None and bool(row[0])


class _Job(Generic[T]):
    __slots__ = ("exclusive", "fn", "future")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], T], future: asyncio.Future[T], exclusive: bool
    ) -> None:
        self.fn = fn
        self.future = future
        self.exclusive = exclusive


_STOP = object()
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _deliver(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the caller gave up waiting; the write itself stands
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class _ConnectionThread:
    """One SQLite connection used only by its own thread. Jobs run in submission order.

    ``grouped`` (the writer): the jobs queued together run in one transaction, each in a savepoint, and
    are answered after the commit. Otherwise (the reader) each job runs on its own in autocommit mode.
    A job marked ``exclusive`` runs alone outside any group transaction (migrations manage their own).
    """

    def __init__(self, path: str, *, name: str, grouped: bool) -> None:
        self._path = path
        self._name = name
        self._grouped = grouped
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        # How well group commit works, for tests and benchmarks: writes answered and commits made.
        self.grouped_writes = 0
        self.group_commits = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(opened,), name=self._name, daemon=True)
        self._thread.start()
        await opened
        self._open = True

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._open = False
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, exclusive: bool = False) -> T:
        if not self._open or self._loop is None:
            raise StoreClosed("the SQLite store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(fn, future, exclusive))
        return await future

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        conn.execute("PRAGMA busy_timeout = 5000")
        if self._grouped:
            conn.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL still commits atomically and survives a process crash; it only skips the
            # fsync per commit (a power cut may lose the last commits, never corrupt the file).
            conn.execute("PRAGMA synchronous = NORMAL")
        else:
            conn.execute("PRAGMA query_only = 1")
        return conn

    def _main(self, opened: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            self._loop.call_soon_threadsafe(_settle, opened, exc)
            return
        self._loop.call_soon_threadsafe(_settle, opened, None)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        assert self._loop is not None
        held: Any = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is _STOP:
                return
            group: list[_Job[Any]] = [job]
            if not job.exclusive:
                while len(group) < MAX_GROUP:
                    try:
                        follower = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if follower is _STOP or follower.exclusive:
                        held = follower
                        break
                    group.append(follower)
            if self._grouped and not job.exclusive:
                outcomes = self._run_group(conn, group)
            else:
                outcomes = [self._run_alone(conn, member) for member in group]
            self._loop.call_soon_threadsafe(_deliver, outcomes)

    @staticmethod
    def _run_alone(conn: sqlite3.Connection, job: _Job[Any]) -> _Outcome:
        try:
            return (job.future, job.fn(conn), None)
        except Exception as exc:
            return (job.future, None, exc)

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> list[_Outcome]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(job.future, None, exc) for job in group]
        outcomes: list[_Outcome] = []
        try:
            for job in group:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job.future, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job.future, result, None))
            conn.execute("COMMIT")
            self.group_commits += 1
            self.grouped_writes += len(group)
        except sqlite3.Error as exc:
            # Nothing of this group is durable: every caller hears the failure, none is told "stored".
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(job.future, None, exc) for job in group]
        return outcomes


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _path_from_url(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise InvalidArgument(
            f"invalid SQLite store URL {url!r}: use sqlite:///relative/path.db or sqlite:////abs/path.db"
        )
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        raise InvalidArgument(
            f"invalid SQLite store URL {url!r}: name a database file, e.g. sqlite:///comfyfleet.db"
        )
    return path


class SQLiteStore:
    """The :class:`~comfyfleet.store.base.Store` on one SQLite file (``sqlite:///path.db``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = _path_from_url(url)
        self._writer = _ConnectionThread(self.path, name="comfyfleet-sqlite-writer", grouped=True)
        self._reader = _ConnectionThread(self.path, name="comfyfleet-sqlite-reader", grouped=False)
        self._hub = NotificationHub()
        self._state = "new"

    @property
    def write_stats(self) -> tuple[int, int]:
        """``(writes, commits)`` so far: how many writes each group commit carried on average."""
        return self._writer.grouped_writes, self._writer.group_commits

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise StoreClosed("a store can be opened once; build a new one")
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the directory of SQLite store {self.path}: {exc}") from exc
        try:
            # The writer first: it switches the file to WAL before the reader opens it.
            await self._writer.start()
            await self._reader.start()
        except sqlite3.Error as exc:
            await self._writer.stop()
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state != "open":
            return
        self._state = "closed"
        self._hub.close()
        # The writer finishes what is queued before it stops, so no accepted write is dropped.
        await self._writer.stop()
        await self._reader.stop()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreClosed(f"the SQLite store is {self._state}; use it inside 'async with'")

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, exclusive: bool = False) -> T:
        self._check_open()
        try:
            return await self._writer.run(fn, exclusive=exclusive)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        try:
            return await self._reader.run(fn)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "no such table" in text:
            return StoreUnavailable(f"the SQLite store {self.path} is not migrated: run 'comfyfleet migrate'")
        if isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailable(f"SQLite store {self.path} is unavailable: {text}")
        return StoreError(f"SQLite store {self.path}: {text}")

    # -- schema ---------------------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        migrations = load_migrations("sqlite")

        def apply(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            applied: list[int] = []
            for migration in migrations:
                # One transaction per migration, re-checked under the write lock: another process
                # migrating the same file at the same time applies each version once.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    done = conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
                    ).fetchone()
                    if done is None:
                        for statement in _split_statements(migration.sql):
                            conn.execute(statement)
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                            (migration.version, migration.name, _ts(utcnow())),
                        )
                        applied.append(migration.version)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return applied

        applied = await self._write(apply, exclusive=True)
        if applied:
            logger.info("store_migrated backend=sqlite versions=%s", applied)
        return applied

    async def is_ready(self) -> bool:
        if self._state != "open":
            return False
        latest = max(migration.version for migration in load_migrations("sqlite"))

        def current(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            return None if row is None else row[0]

        try:
            version = await self._read(current)
        except StoreError:
            return False
        return version is not None and version >= latest

    # -- submission and reading -----------------------------------------------------------------
    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        now = utcnow()
        task_id = new.id or str(uuid4())
        stamp = _ts(now)
        params = (
            task_id,
            new.tenant,
            new.workflow_id,
            new.priority,
            _dumps(new.payload),
            stamp,
            stamp,
            new.max_retries,
            new.timeout_s,
            new.idempotency_key,
            new.pool,
            _dumps(new.inputs),
            _dumps(new.webhook),
            _dumps(new.metadata),
        )

        def insert(conn: sqlite3.Connection) -> tuple[int | None, tuple[Any, ...] | None]:
            try:
                row = conn.execute(
                    "INSERT INTO tasks (id, tenant, workflow_id, priority, status, payload, created_at, updated_at, "
                    "max_retries, timeout_s, idempotency_key, pool, inputs, webhook, metadata) "
                    "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING "
                    "RETURNING seq",
                    params,
                ).fetchone()
            except sqlite3.IntegrityError as exc:
                # Only a caller-chosen id can collide (a minted uuid4 does not).
                raise Conflict(f"a task with id {task_id} already exists") from exc
            if row is not None:
                return row[0], None
            existing = conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE tenant = ? AND idempotency_key = ?",
                (new.tenant, new.idempotency_key),
            ).fetchone()
            return None, existing

        seq, existing = await self._write(insert)
        if existing is not None:
            return _task(existing), False
        assert seq is not None
        task = Task(
            id=task_id,
            seq=seq,
            workflow_id=new.workflow_id,
            priority=new.priority,
            status=TaskStatus.PENDING,
            payload=new.payload,
            created_at=now,
            updated_at=now,
            tenant=new.tenant,
            max_retries=new.max_retries,
            timeout_s=new.timeout_s,
            idempotency_key=new.idempotency_key,
            pool=new.pool,
            inputs=new.inputs,
            webhook=new.webhook,
            metadata=new.metadata,
        )
        return task, True

    async def get_task(self, task_id: str, tenant: str | None = None) -> Task:
        def select(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            return row

        row = await self._read(select)
        if row is None or (tenant is not None and row[2] != tenant):
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
        params: list[Any] = []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if statuses is not None:
            wanted = [TaskStatus(status).value for status in statuses]
            if not wanted:
                return TaskPage([], None)
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if workflow_id is not None:
            clauses.append("workflow_id = ?")
            params.append(workflow_id)
        if cursor is not None:
            clauses.append("seq < ?")
            params.append(decode_cursor(cursor))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_LISTED_COLUMNS} FROM tasks {where} ORDER BY seq DESC LIMIT ?"
        params.append(limit + 1)

        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        tasks = [_task(row) for row in rows[:limit]]
        next_cursor = encode_cursor(tasks[-1].seq) if len(rows) > limit else None
        return TaskPage(tasks, next_cursor)

    async def queue_position(self, task_id: str) -> int | None:
        # The number of runnable tasks a claim would take first, plus one. A pending task that is not due
        # yet (a retry waiting for its not_before) gets the place it will have once due: the runnable
        # tasks ahead of it in claim order, plus one.
        now = _ts(utcnow())

        def position(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT status, priority, seq FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or row[0] != TaskStatus.PENDING:
                return None
            _, priority, seq = row
            ahead = conn.execute(
                f"SELECT (SELECT count(*) FROM {_PENDING} WHERE {_RUNNABLE} AND priority > ?)"
                f" + (SELECT count(*) FROM {_PENDING} WHERE {_RUNNABLE} AND priority = ? AND seq < ?)",
                (now, priority, now, priority, seq),
            ).fetchone()[0]
            return int(ahead) + 1

        return await self._read(position)

    async def queue_metrics(self, tenant: str | None = None) -> QueueMetrics:
        now = utcnow()

        def metrics(conn: sqlite3.Connection) -> tuple[dict[str, int], str | None]:
            if tenant is None:
                counts = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
                oldest = conn.execute(
                    "SELECT created_at FROM tasks WHERE status = 'pending' ORDER BY seq LIMIT 1"
                ).fetchone()
            else:
                counts = conn.execute(
                    "SELECT status, count(*) FROM tasks WHERE tenant = ? GROUP BY status", (tenant,)
                ).fetchall()
                oldest = conn.execute(
                    "SELECT created_at FROM tasks WHERE status = 'pending' AND tenant = ? ORDER BY seq LIMIT 1",
                    (tenant,),
                ).fetchone()
            return dict(counts), (oldest[0] if oldest else None)

        counts, oldest = await self._read(metrics)
        age = None if oldest is None else max(0.0, (now - datetime.fromisoformat(oldest)).total_seconds())
        return QueueMetrics(
            pending_tasks=counts.get("pending", 0),
            running_tasks=counts.get("running", 0),
            completed_tasks=counts.get("completed", 0),
            failed_tasks=counts.get("failed", 0),
            cancelled_tasks=counts.get("cancelled", 0),
            oldest_pending_age_s=age,
        )

    async def demand_by_pool(self) -> dict[str | None, tuple[int, int]]:
        now = _ts(utcnow())
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT pool, sum({_RUNNABLE}), sum(status = 'running') FROM tasks "
                "WHERE status IN ('pending', 'running') GROUP BY pool",
                (now,),
            ).fetchall()
        )
        return {
            pool: (int(runnable), int(running)) for pool, runnable, running in rows if runnable or running
        }

    async def count_by_status_and_priority(self) -> list[tuple[TaskStatus, int, int]]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT status, priority, count(*) FROM tasks GROUP BY status, priority ORDER BY status, priority"
            ).fetchall()
        )
        return [(TaskStatus(status), priority, count) for status, priority, count in rows]

    # -- cancel ---------------------------------------------------------------------------------
    async def cancel_task(self, task_id: str, tenant: str | None = None) -> Task:
        now = _ts(utcnow())

        def cancel(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(
                "UPDATE tasks SET "
                "cancel_requested = (status = 'running') OR cancel_requested, "
                "completed_at = CASE WHEN status = 'pending' THEN ? ELSE completed_at END, "
                "error = CASE WHEN status = 'pending' THEN 'cancelled by request' ELSE error END, "
                "error_kind = CASE WHEN status = 'pending' THEN 'cancelled' ELSE error_kind END, "
                "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END, "
                "updated_at = ? "
                "WHERE id = ? AND (? IS NULL OR tenant = ?) AND status IN ('pending', 'running') "
                f"RETURNING {TASK_COLUMNS}",
                (now, now, task_id, tenant, tenant),
            ).fetchone()
            if row is not None:
                return tuple(row)
            status = _status_of(conn, task_id, tenant)
            if status is None:
                raise NotFound(f"task {task_id} not found")
            raise Conflict(f"task {task_id} is already {status}")

        return _task(await self._write(cancel))

    async def set_priority(self, task_id: str, priority: int, tenant: str | None = None) -> Task:
        now = _ts(utcnow())

        def change(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(
                "UPDATE tasks SET priority = ?, updated_at = ? "
                f"WHERE id = ? AND (? IS NULL OR tenant = ?) AND status = 'pending' RETURNING {TASK_COLUMNS}",
                (priority, now, task_id, tenant, tenant),
            ).fetchone()
            if row is not None:
                return tuple(row)
            raise not_pending(task_id, _status_of(conn, task_id, tenant))

        return _task(await self._write(change))

    # -- the dispatcher's side ------------------------------------------------------------------
    async def claim(
        self,
        owner: str,
        lease_s: float,
        *,
        limit: int = 1,
        pools: Collection[str | None] | None = None,
    ) -> list[Task]:
        pool_clause, pool_params = _pool_filter(pools)
        if limit < 1 or pool_clause is None:
            return []
        now = utcnow()
        picked = (
            f"SELECT seq FROM {_PENDING} WHERE {_RUNNABLE}{pool_clause} ORDER BY priority DESC, seq LIMIT ?"
        )
        return await self._claim_where(
            f"seq IN ({picked})", (_ts(now), *pool_params, limit), owner, lease_s, now
        )

    async def claim_ids(self, owner: str, lease_s: float, task_ids: Collection[str]) -> list[Task]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        now = utcnow()
        where = f"id IN ({', '.join('?' * len(ids))}) AND {_RUNNABLE}"
        return await self._claim_where(where, (*ids, _ts(now)), owner, lease_s, now)

    async def _claim_where(
        self, where: str, where_params: tuple[Any, ...], owner: str, lease_s: float, now: datetime
    ) -> list[Task]:
        stamp = _ts(now)
        sql = (
            "UPDATE tasks SET status = 'running', phase = 'dispatching', attempt = attempt + 1, "
            "started_at = coalesce(started_at, ?), attempt_started_at = ?, lease_owner = ?, lease_expires_at = ?, "
            "worker_id = NULL, prompt_id = NULL, progress = NULL, updated_at = ? "
            f"WHERE {where} RETURNING {TASK_COLUMNS}"
        )
        params = (stamp, stamp, owner, _ts(now + timedelta(seconds=lease_s)), stamp, *where_params)
        rows = await self._write(lambda conn: conn.execute(sql, params).fetchall())
        tasks = [_task(row) for row in rows]
        # RETURNING gives no order guarantee; callers expect claim order.
        tasks.sort(key=lambda task: (-task.priority, task.seq))
        return tasks

    async def peek_pending(self, *, limit: int, pools: Collection[str | None] | None = None) -> list[Task]:
        pool_clause, pool_params = _pool_filter(pools)
        if limit < 1 or pool_clause is None:
            return []
        sql = (
            f"SELECT {TASK_COLUMNS} FROM {_PENDING} WHERE {_RUNNABLE}{pool_clause} "
            "ORDER BY priority DESC, seq LIMIT ?"
        )
        params = (_ts(utcnow()), *pool_params, limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [_task(row) for row in rows]

    async def peek_pending_per_tenant(
        self, *, limit: int, pools: Collection[str | None] | None = None
    ) -> list[Task]:
        pool_clause, pool_params = _pool_filter(pools)
        if limit < 1 or pool_clause is None:
            return []
        sql = (
            f"SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_pending_tenant WHERE tenant = ? AND {_RUNNABLE}"
            f"{pool_clause} ORDER BY priority DESC, seq LIMIT ?"
        )
        now = _ts(utcnow())

        def peek(conn: sqlite3.Connection) -> list[Task]:
            tenants = [row[0] for row in conn.execute(_PENDING_TENANTS).fetchall()]
            rows = [
                row for tenant in tenants for row in conn.execute(sql, (tenant, now, *pool_params, limit))
            ]
            return sorted((_task(row) for row in rows), key=lambda task: (-task.priority, task.seq))

        return await self._read(peek)

    async def running_per_tenant(self) -> dict[str, int]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT tenant, count(*) FROM tasks WHERE status = 'running' GROUP BY tenant"
            ).fetchall()
        )
        return {str(tenant): int(count) for tenant, count in rows}

    async def _fenced(self, lease: Lease, assignments: str, params: tuple[Any, ...]) -> Task:
        """``UPDATE`` one running attempt if ``lease`` is still current, else :class:`StaleLease`."""
        sql = f"UPDATE tasks SET {assignments}, updated_at = ? WHERE {_FENCE} RETURNING {TASK_COLUMNS}"
        full = (*params, _ts(utcnow()), lease.task_id, lease.attempt, lease.owner)

        def write(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(sql, full).fetchone()
            if row is None:
                raise _fence_failure(conn, lease)
            return tuple(row)

        return _task(await self._write(write))

    async def record_dispatch(self, lease: Lease, worker_id: str, prompt_id: str) -> Task:
        return await self._fenced(lease, "worker_id = ?, prompt_id = ?", (worker_id, prompt_id))

    async def set_phase(self, lease: Lease, phase: TaskPhase, progress: dict[str, Any] | None = None) -> Task:
        return await self._fenced(
            lease, "phase = ?, progress = coalesce(?, progress)", (TaskPhase(phase).value, _dumps(progress))
        )

    async def set_progress(self, lease: Lease, progress: dict[str, Any]) -> None:
        params = (_dumps(progress), _ts(utcnow()), lease.task_id, lease.attempt, lease.owner)

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                f"UPDATE tasks SET progress = ?, updated_at = ? WHERE {_FENCE} RETURNING seq", params
            ).fetchone()
            if row is None:
                raise _fence_failure(conn, lease)

        await self._write(write)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        expires = _ts(utcnow() + timedelta(seconds=lease_s))
        return await self._write(
            lambda conn: (
                conn.execute(
                    "UPDATE tasks SET lease_expires_at = ? WHERE status = 'running' AND lease_owner = ?",
                    (expires, owner),
                ).rowcount
            )
        )

    async def complete_task(self, lease: Lease, result: dict[str, Any]) -> Task:
        now = _ts(utcnow())
        return await self._fenced(
            lease,
            f"status = 'completed', result = ?, completed_at = ?, error = NULL, error_kind = NULL, "
            f"error_details = NULL, {_LEAVE_RUNNING}, {_APPEND_ATTEMPT}",
            (_dumps(result), now, now, "completed", None, None),
        )

    async def fail_task(
        self, lease: Lease, error: str, kind: str, details: dict[str, Any] | None = None
    ) -> Task:
        now = _ts(utcnow())
        return await self._fenced(
            lease,
            f"status = 'failed', error = ?, error_kind = ?, error_details = ?, completed_at = ?, "
            f"{_LEAVE_RUNNING}, {_APPEND_ATTEMPT}",
            (error, kind, _dumps(details), now, now, "failed", error, kind),
        )

    async def retry_task(
        self,
        lease: Lease,
        not_before: datetime,
        error: str,
        kind: str,
        details: dict[str, Any] | None = None,
    ) -> Task:
        now = _ts(utcnow())
        sql = (
            "UPDATE tasks SET status = 'pending', retry_count = retry_count + 1, not_before = ?, "
            "error = ?, error_kind = ?, error_details = ?, worker_id = NULL, prompt_id = NULL, "
            f"attempt_started_at = NULL, progress = NULL, {_LEAVE_RUNNING}, {_APPEND_ATTEMPT}, updated_at = ? "
            f"WHERE {_FENCE} AND NOT cancel_requested RETURNING {TASK_COLUMNS}"
        )
        params = (
            _ts(not_before),
            error,
            kind,
            _dumps(details),
            now,
            "retry",
            error,
            kind,
            now,
            lease.task_id,
            lease.attempt,
            lease.owner,
        )
        return await self._fenced_unless_cancelled(lease, sql, params)

    async def release_task(self, lease: Lease) -> Task:
        now = _ts(utcnow())
        # An attempt given back never ran, so it is not recorded; started_at goes back to unset if no
        # attempt ever ran.
        sql = (
            "UPDATE tasks SET status = 'pending', worker_id = NULL, prompt_id = NULL, attempt_started_at = NULL, "
            "progress = NULL, started_at = CASE WHEN json_array_length(attempts) = 0 THEN NULL ELSE started_at END, "
            f"{_LEAVE_RUNNING}, updated_at = ? WHERE {_FENCE} AND NOT cancel_requested RETURNING {TASK_COLUMNS}"
        )
        return await self._fenced_unless_cancelled(
            lease, sql, (now, lease.task_id, lease.attempt, lease.owner)
        )

    async def _fenced_unless_cancelled(self, lease: Lease, sql: str, params: tuple[Any, ...]) -> Task:
        """Retry and release put a task back in the queue, unless its cancel was requested meanwhile:
        then it ends as cancelled instead of running again."""

        def write(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = conn.execute(sql, params).fetchone()
            if row is not None:
                return tuple(row)
            if _cancel_pending_for(conn, lease):
                return None
            raise _fence_failure(conn, lease)

        row = await self._write(write)
        if row is None:
            return await self.finish_cancelled(lease)
        return _task(row)

    async def finish_cancelled(self, lease: Lease, reason: str = "cancelled by request") -> Task:
        now = _ts(utcnow())
        return await self._fenced(
            lease,
            f"status = 'cancelled', error = ?, error_kind = 'cancelled', completed_at = ?, "
            f"{_LEAVE_RUNNING}, {_APPEND_ATTEMPT}",
            (reason, now, now, "cancelled", reason, "cancelled"),
        )

    async def adopt_expired(
        self, owner: str, lease_s: float, *, limit: int = 100, previous_owner: str | None = None
    ) -> list[Task]:
        if limit < 1:
            return []
        now = utcnow()
        stamp = _ts(now)
        sql = (
            "UPDATE tasks SET lease_owner = ?, lease_expires_at = ?, attempt = attempt + 1, updated_at = ? "
            "WHERE seq IN (SELECT seq FROM tasks WHERE status = 'running' "
            "AND (lease_expires_at <= ? OR lease_owner = ?) "
            f"ORDER BY lease_expires_at LIMIT ?) RETURNING {TASK_COLUMNS}"
        )
        params = (owner, _ts(now + timedelta(seconds=lease_s)), stamp, stamp, previous_owner, limit)
        rows = await self._write(lambda conn: conn.execute(sql, params).fetchall())
        adopted = sorted((_task(row) for row in rows), key=lambda task: task.seq)
        for task in adopted:
            logger.info("task_adopted task_id=%s attempt=%s owner=%s", task.id, task.attempt, owner)
        return adopted

    async def running_tasks(self, owner: str | None = None) -> list[Task]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'running' AND (? IS NULL OR lease_owner = ?) "
                "ORDER BY seq",
                (owner, owner),
            ).fetchall()
        )
        return [_task(row) for row in rows]

    async def next_due_at(self) -> datetime | None:
        now = _ts(utcnow())
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT min(not_before) FROM tasks WHERE status = 'pending' AND not_before IS NOT NULL "
                "AND not_before > ?",
                (now,),
            ).fetchone()
        )
        return _dt(row[0])

    # -- workers --------------------------------------------------------------------------------
    async def upsert_worker(self, worker: Worker) -> Worker:
        params = (
            worker.id,
            worker.pool,
            worker.provider,
            WorkerState(worker.state).value,
            _ts(worker.created_at),
            _ts(utcnow()),
            worker.endpoint,
            worker.provider_id,
            _dumps(list(worker.current_task_ids)),
            None if worker.last_active_at is None else _ts(worker.last_active_at),
            worker.health_failures,
            _dumps(list(worker.loaded_models)),
            _dumps(worker.node_types),
            worker.error,
            _dumps(dict(worker.labels)),
            _dumps(dict(worker.info)),
        )
        # created_at is the first record's: a worker is created once, however often it is updated.
        sql = (
            f"INSERT INTO workers ({WORKER_COLUMNS}) VALUES ({', '.join('?' * 16)}) "
            "ON CONFLICT (id) DO UPDATE SET pool = excluded.pool, provider = excluded.provider, "
            "state = excluded.state, updated_at = excluded.updated_at, endpoint = excluded.endpoint, "
            "provider_id = excluded.provider_id, current_task_ids = excluded.current_task_ids, "
            "last_active_at = excluded.last_active_at, health_failures = excluded.health_failures, "
            "loaded_models = excluded.loaded_models, node_types = excluded.node_types, error = excluded.error, "
            f"labels = excluded.labels, info = excluded.info RETURNING {WORKER_COLUMNS}"
        )
        row = await self._write(lambda conn: tuple(conn.execute(sql, params).fetchone()))
        return _worker(row)

    async def get_worker(self, worker_id: str) -> Worker:
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {WORKER_COLUMNS} FROM workers WHERE id = ?", (worker_id,)
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"worker {worker_id} not found")
        return _worker(row)

    async def list_workers(self, *, pool: str | None = None, include_gone: bool = False) -> list[Worker]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {WORKER_COLUMNS} FROM workers WHERE (? IS NULL OR pool = ?) "
                "AND (? OR state != 'terminated') ORDER BY created_at, id",
                (pool, pool, include_gone),
            ).fetchall()
        )
        return [_worker(row) for row in rows]

    async def delete_worker(self, worker_id: str) -> None:
        await self._write(lambda conn: conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,)))

    async def worker_metrics(self) -> WorkerMetrics:
        rows = await self._read(
            lambda conn: conn.execute("SELECT state, count(*) FROM workers GROUP BY state").fetchall()
        )
        return worker_metrics_from_counts(dict(rows))

    # -- webhook outbox -------------------------------------------------------------------------
    async def claim_webhook_deliveries(
        self, owner: str, lease_s: float, *, limit: int = 20
    ) -> list[WebhookDelivery]:
        if limit < 1:
            return []
        now = utcnow()
        stamp = _ts(now)
        sql = (
            "UPDATE webhook_deliveries SET lease_owner = ?, lease_expires_at = ?, updated_at = ? "
            "WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ? "
            "AND (lease_expires_at IS NULL OR lease_expires_at <= ?) ORDER BY next_attempt_at, id LIMIT ?) "
            f"RETURNING {WEBHOOK_COLUMNS}"
        )
        params = (owner, _ts(now + timedelta(seconds=lease_s)), stamp, stamp, stamp, limit)
        rows = await self._write(lambda conn: conn.execute(sql, params).fetchall())
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
        now = _ts(utcnow())
        status = {"delivered": "delivered", "retry": "pending", "failed": "failed"}[outcome]
        sql = (
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, "
            "next_attempt_at = coalesce(?, next_attempt_at), lease_owner = NULL, lease_expires_at = NULL, "
            "updated_at = ?, delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END, "
            "last_status_code = ?, last_error = ?, history = json_insert(history, '$[#]', json_object("
            "'attempt', attempts + 1, 'at', ?, 'status_code', ?, 'error', ?, 'duration_ms', ?)) "
            f"WHERE id = ? AND lease_owner = ? AND status = 'pending' RETURNING {WEBHOOK_COLUMNS}"
        )
        due = _ts(next_attempt_at) if next_attempt_at is not None else None
        duration_ms = round(duration_s * 1000, 1)
        params = (
            status,
            due,
            now,
            status,
            now,
            status_code,
            error,
            now,
            status_code,
            error,
            duration_ms,
            delivery_id,
            owner,
        )

        def write(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(sql, params).fetchone()
            if row is None:
                raise StaleLease(
                    f"webhook delivery {delivery_id} is not leased to {owner} (or already finished)"
                )
            return tuple(row)

        return _delivery(await self._write(write))

    async def webhook_deliveries(self, task_id: str) -> list[WebhookDelivery]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {WEBHOOK_COLUMNS} FROM webhook_deliveries WHERE task_id = ? ORDER BY id", (task_id,)
            ).fetchall()
        )
        return [_delivery(row) for row in rows]

    async def next_webhook_due_at(self) -> datetime | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"
            ).fetchone()
        )
        return _dt(row[0])

    # -- coordination ---------------------------------------------------------------------------
    async def notify(self, channel: str, payload: str = "") -> None:
        self._check_open()
        self._hub.publish(Notification(channel, payload))

    def listen(self) -> Subscription:
        self._check_open()
        return self._hub.subscribe()

    async def try_leader(self, name: str) -> bool:
        self._check_open()
        return True  # one replica per SQLite file: it leads everything

    async def installation_id(self) -> str:
        row = await self._read(lambda conn: conn.execute("SELECT id FROM installation").fetchone())
        if row is None:
            raise StoreUnavailable(
                f"the SQLite store {self.path} has no installation id: run 'comfyfleet migrate'"
            )
        return str(row[0])


def _status_of(conn: sqlite3.Connection, task_id: str, tenant: str | None) -> str | None:
    """A task's status as ``tenant`` sees it (None: unknown to that tenant)."""
    row = conn.execute(
        "SELECT status FROM tasks WHERE id = ? AND (? IS NULL OR tenant = ?)", (task_id, tenant, tenant)
    )
    found = row.fetchone()
    return None if found is None else str(found[0])


def _pool_filter(pools: Collection[str | None] | None) -> tuple[str | None, list[Any]]:
    """The ``AND …`` clause restricting a claim to ``pools``; ``None`` clause when nothing can match."""
    if pools is None:
        return "", []
    named = sorted({pool for pool in pools if pool is not None})
    parts: list[str] = []
    if named:
        parts.append(f"pool IN ({', '.join('?' * len(named))})")
    if None in pools:
        parts.append("pool IS NULL")
    if not parts:
        return None, []
    return f" AND ({' OR '.join(parts)})", list(named)


def _split_statements(script: str) -> list[str]:
    """The statements of a migration file, split where SQLite itself sees a statement end (so a trigger's
    ``BEGIN … END`` body stays whole)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise ValueError(f"migration ends inside a statement: {pending.strip()[:80]!r}")
    return statements
