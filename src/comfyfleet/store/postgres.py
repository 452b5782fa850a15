"""The shared store: PostgreSQL through an asyncpg pool, for one or several replicas.

The behaviour is the shared store's (``sql.py``); this module keeps what is PostgreSQL's own: its few SQL
tokens, its connection pool, its wake-ups and its leadership locks.

Claims lock the rows they pick with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers in any number of
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
import dataclasses
import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Any, Self
from urllib.parse import urlsplit
from uuid import uuid4

import asyncpg

from comfyfleet.domain import NewTask, Task
from comfyfleet.store._batch import Batcher
from comfyfleet.store._common import advisory_key, json_text, load_migrations
from comfyfleet.store._notify import NotificationHub, Subscription
from comfyfleet.store._rows import TASK_COLUMNS, Codec, Row
from comfyfleet.store._statements import Statements, base64_size
from comfyfleet.store.base import (
    Conflict,
    InvalidArgument,
    Notification,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)
from comfyfleet.store.sql import SqlStore

logger = logging.getLogger("comfyfleet.store.postgres")

NOTIFY_CHANNEL = "comfyfleet"
# PostgreSQL refuses NOTIFY payloads from 8000 bytes on; keep a margin for the envelope.
MAX_NOTIFY_BYTES = 7900
# How often the listening connection proves it is alive; a silently dropped socket is noticed this late.
LISTENER_PING_S = 5.0
MIGRATION_LOCK = advisory_key("store", "migrations")

# sqlstate classes that mean "the database cannot serve us": connection exception, insufficient
# resources (too many connections), operator intervention (shutdown, starting up), authorization refused,
# no such database.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "28", "3D")
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


class PostgresStatements(Statements):
    dialect = "postgres"
    # The database's clock: the replicas agree on when a lease expires however their own clocks drift.
    now = "now()"
    lease_expiry = "now() + make_interval(secs => :lease_s)"
    inputs_summary = (
        "CASE WHEN tasks.inputs IS NULL THEN NULL ELSE (SELECT coalesce(jsonb_agg(CASE "
        "WHEN jsonb_typeof(spec->'data') = 'string' THEN (spec - 'data') || jsonb_build_object('size', "
        + base64_size("(spec->>'data')")
        + ") ELSE spec END ORDER BY position), '[]'::jsonb) "
        "FROM jsonb_array_elements(tasks.inputs) WITH ORDINALITY AS element(spec, position)) END"
    )

    # Submissions without an idempotency key, many in one statement (see ``_batch``): one array per column,
    # JSON as text; rows are numbered in the arrays' order, so FIFO holds within a batch.
    insert_tasks = (
        "INSERT INTO tasks (id, tenant, workflow_id, priority, status, payload, created_at, updated_at, "
        "max_retries, timeout_s, pool, inputs, webhook, metadata, models) "
        "SELECT id, tenant, workflow_id, priority, 'pending', CAST(payload AS JSONB), now(), now(), max_retries, "
        "timeout_s, pool, CAST(inputs AS JSONB), CAST(webhook AS JSONB), CAST(metadata AS JSONB), "
        "CAST(models AS JSONB) "
        "FROM unnest(CAST(:ids AS TEXT[]), CAST(:tenants AS TEXT[]), CAST(:workflow_ids AS TEXT[]), "
        "CAST(:priorities AS BIGINT[]), CAST(:payloads AS TEXT[]), CAST(:max_retries AS INTEGER[]), "
        "CAST(:timeouts AS DOUBLE PRECISION[]), CAST(:pools AS TEXT[]), CAST(:inputs AS TEXT[]), "
        "CAST(:webhooks AS TEXT[]), CAST(:metadatas AS TEXT[]), CAST(:models AS TEXT[])) WITH ORDINALITY AS "
        "given(id, tenant, workflow_id, priority, payload, max_retries, timeout_s, pool, inputs, webhook, "
        "metadata, models, position) "
        "ORDER BY position RETURNING id, seq, created_at"
    )

    notify_many = (
        "SELECT pg_notify(CAST(:channel AS TEXT), envelope) "
        "FROM unnest(CAST(:envelopes AS TEXT[])) WITH ORDINALITY AS sent(envelope, position) ORDER BY position"
    )

    def in_list(self, column: str, parameter: str) -> str:
        return f"{column} = ANY(CAST(:{parameter} AS TEXT[]))"

    def pick(self, key: str, subselect: str) -> str:
        # SKIP LOCKED: rows another claimer is taking right now are passed over, not waited for, so concurrent
        # claimers share the queue head without blocking. ``key = ANY(ARRAY(…))`` rather than a join: with
        # prepared statements PostgreSQL soon plans generically, cannot see the LIMIT, and would hash-join the
        # whole table; a key array is always an index lookup.
        return f"{key} = ANY(ARRAY({subselect} FOR UPDATE SKIP LOCKED))"

    def append_json(self, column: str, fields: str) -> str:
        return f"{column} || jsonb_build_array(jsonb_build_object({fields}))"

    def seconds_since(self, column: str) -> str:
        return f"extract(epoch FROM now() - {column})"

    def as_json(self, parameter: str) -> str:
        return f"CAST(:{parameter} AS JSONB)"

    @cached_property
    def peek_pending_per_tenant(self) -> str:
        return (
            f"{self.pending_tenants} SELECT head.* FROM tenants "
            f"CROSS JOIN LATERAL ({self.tenant_head(TASK_COLUMNS)}) AS head"
        )


SQL = PostgresStatements()
# A named parameter, or a string literal (left as it is, whatever it holds).
_NAMED_PARAMETER = re.compile(r"'[^']*'|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with its named parameters (``:name``) numbered as asyncpg wants them (``$1``), and the names in
    that order. Casts (``::text``) and string literals are left alone."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match[1]
        if name is None:
            return match[0]
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED_PARAMETER.sub(number, sql), tuple(names)


class _PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """Handed back to the pool without asyncpg's reset query (a round trip per release, per batch of submissions):
    no session state is left on pool connections (LISTEN and leader locks hold connections of their own, nothing
    sets a session variable or opens a cursor); asyncpg still rolls back a transaction left open."""

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json_text, decoder=json.loads, schema="pg_catalog")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresStore(SqlStore):
    """The :class:`~comfyfleet.store.base.Store` on PostgreSQL (``postgresql://user@host:port/db``)."""

    sql = SQL
    codec = Codec()  # JSON and times go through asyncpg's own codecs

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
        self._inserts: Batcher[NewTask, tuple[Task, bool]] = Batcher(self._insert_many, self._insert_one)
        self._notices: Batcher[str, None] = Batcher(self._send_notices, self._send_notice)

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
                connection_class=_PooledConnection,
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
        await self._inserts.close()
        await self._notices.close()
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
        if isinstance(exc, asyncpg.UniqueViolationError):
            return Conflict(f"PostgreSQL at {self._where}: {_describe(exc)}")
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

    # -- the seam of the shared store -----------------------------------------------------------
    def _is_open(self) -> bool:
        return self._state == "open"

    async def _read(self, sql: str, params: dict[str, Any]) -> list[Row]:
        text, names = numbered(sql)
        async with self._connection() as conn:
            rows: list[Row] = await conn.fetch(text, *[params[name] for name in names])
            return rows

    _write = _read  # every statement is its own transaction, on whichever connection is free

    # -- coordination ---------------------------------------------------------------------------
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

    # -- submissions, batched -------------------------------------------------------------------
    async def create_task(self, new: NewTask) -> tuple[Task, bool]:
        # With an idempotency key an insert may find another's task instead: that one goes alone.
        if new.idempotency_key is not None:
            return await super().create_task(new)
        return await self._inserts.submit(dataclasses.replace(new, id=new.id or str(uuid4())))

    async def _insert_one(self, new: NewTask) -> tuple[Task, bool]:
        return await super().create_task(new)

    async def _insert_many(self, batch: list[NewTask]) -> list[tuple[Task, bool]]:
        def texts(name: str) -> list[str | None]:
            return [None if getattr(new, name) is None else json_text(getattr(new, name)) for new in batch]

        params = {
            "ids": [new.id for new in batch],
            "tenants": [new.tenant for new in batch],
            "workflow_ids": [new.workflow_id for new in batch],
            "priorities": [new.priority for new in batch],
            "payloads": texts("payload"),
            "max_retries": [new.max_retries for new in batch],
            "timeouts": [float(new.timeout_s) for new in batch],
            "pools": [new.pool for new in batch],
            "inputs": texts("inputs"),
            "webhooks": texts("webhook"),
            "metadatas": texts("metadata"),
            "models": texts("models"),
        }
        rows = await self._write(self.sql.insert_tasks, params)
        stored = {row[0]: (row[1], self.codec.load_time(row[2])) for row in rows}
        return [(self._new_task(new, str(new.id), *stored[str(new.id)]), True) for new in batch]

    async def notify(self, channel: str, payload: str = "") -> None:
        envelope = json.dumps({"o": self._origin, "c": channel, "p": payload}, separators=(",", ":"))
        if len(envelope.encode()) > MAX_NOTIFY_BYTES:
            raise InvalidArgument(
                f"notification on {channel!r} is too large ({len(envelope.encode())} bytes, at most "
                f"{MAX_NOTIFY_BYTES}): send an id and let listeners read the rest from the store"
            )
        if self._state != "open":
            raise StoreClosed(f"the PostgreSQL store is {self._state}; use it inside 'async with'")
        self._hub.publish(Notification(channel, payload))
        # Sent with the notifications of the same moment, in order, in one statement (a task's every event
        # is relayed, so one round trip each would cost more than the task's own writes).
        await self._notices.submit(envelope)

    async def _send_notices(self, envelopes: list[str]) -> list[None]:
        params = {"channel": NOTIFY_CHANNEL, "envelopes": envelopes}
        await self._write(self.sql.notify_many, params)
        return [None] * len(envelopes)

    async def _send_notice(self, envelope: str) -> None:
        await self._send_notices([envelope])

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
