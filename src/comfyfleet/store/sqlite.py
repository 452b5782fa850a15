"""The embedded store: one SQLite file in WAL mode, for a single replica.

The behaviour is the shared store's (``sql.py``); this module keeps what is SQLite's own: its few SQL tokens
and statements, and its connections.

A short statement (nearly all of them) runs on a connection of the event loop's own thread, which never waits
for SQLite's lock nor checkpoints (``_sqlite_inline.py``): a thread hop would cost more than the statement.
What would wait for the lock, and what may take long (a page of a listing, a purge, a migration), goes to two
connections owned by threads of their own (``_sqlite_threads.py``): the writer, which commits the writes
queued together in one transaction, and the reader, which never waits for the writer.

Writes are serialised by SQLite's lock, so claims cannot race: a claim is one ``UPDATE … RETURNING``. Times are the application's
clock, stored as fixed-width UTC text so that comparing the text compares the times; JSON is stored as text.
Notifications are delivered in-process and ``try_leader`` is always True: one replica.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic_core import from_json

from comfyfleet.background import Background
from comfyfleet.store._common import json_text, load_migrations, utcnow
from comfyfleet.store._notify import NotificationHub, Subscription
from comfyfleet.store._rows import TASK_COLUMNS, Codec, Row
from comfyfleet.store._sqlite_inline import CHECKPOINT_EVERY, Busy, InlineConnection
from comfyfleet.store._sqlite_threads import ConnectionThread
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

logger = logging.getLogger("comfyfleet.store.sqlite")

T = TypeVar("T")


def _dump_time(moment: datetime) -> str:
    # Fixed width and always UTC, so comparing the text compares the times.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dump_json(value: Any) -> str | None:
    return None if value is None else json_text(value)


def _load_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return from_json(text)  # twice as quick as json.loads, to the same values
    except ValueError:
        return json.loads(text)  # what it refuses and json.loads reads: a lone surrogate's escape


CODEC = Codec(
    dump_json=_dump_json,
    load_json=_load_json,
    dump_list=tuple,  # expanded into one placeholder per item by _bind_lists
    dump_time=_dump_time,
    load_time=datetime.fromisoformat,
)


def _bind_lists(sql: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``column IN (:name)`` with a list bound as ``name`` becomes ``column IN (:name_0, :name_1, …)``. (One
    JSON text read with ``json_each`` would keep the statement's text constant, but costs SQLite more than the
    rest of a claim.)"""
    if not any(type(value) is tuple for value in params.values()):
        return sql, params
    bound: dict[str, Any] = {}
    for name, value in params.items():
        if type(value) is tuple:
            sql = _expand(sql, name, len(value))
            bound.update(zip(_item_names(name, len(value)), value, strict=True))
        else:
            bound[name] = value
    return sql, bound


@functools.lru_cache(maxsize=1024)
def _expand(sql: str, name: str, count: int) -> str:
    return sql.replace(f"IN (:{name})", f"IN ({', '.join(':' + item for item in _item_names(name, count))})")


@functools.lru_cache(maxsize=1024)
def _item_names(name: str, count: int) -> tuple[str, ...]:
    return tuple(f"{name}_{index}" for index in range(count))


class SQLiteStatements(Statements):
    dialect = "sqlite"
    now = ":now"
    lease_expiry = ":lease_expires"
    # Without statistics the planner may prefer tasks_status_seq and sort every pending task; name the index.
    pending_by_order = "tasks INDEXED BY tasks_pending_order"
    pending_by_tenant = "tasks INDEXED BY tasks_pending_tenant"
    pending_due = "tasks INDEXED BY tasks_pending_due"
    inputs_summary = (
        "CASE WHEN tasks.inputs IS NULL THEN NULL ELSE (SELECT json_group_array(CASE "
        "WHEN json_type(spec.value, '$.data') = 'text' THEN json_set(json_remove(spec.value, '$.data'), '$.size', "
        + base64_size("json_extract(spec.value, '$.data')")
        + ") ELSE json(spec.value) END) FROM json_each(tasks.inputs) AS spec) END"
    )

    def in_list(self, column: str, parameter: str) -> str:
        return f"{column} IN (:{parameter})"  # see _bind_lists

    def pick(self, key: str, subselect: str) -> str:
        return f"{key} IN ({subselect})"  # one writer: nothing to lock against

    def append_json(self, column: str, fields: str) -> str:
        return f"json_insert({column}, '$[#]', json_object({fields}))"

    def seconds_since(self, column: str) -> str:
        return f"(julianday(:now) - julianday({column})) * 86400.0"

    @cached_property
    def claim_ids(self) -> str:
        # One writer: the rows need no picking (and locking) first.
        return (
            f"UPDATE tasks SET {self.start_attempt} WHERE {self.in_list('id', 'ids')} AND {self.runnable} "
            f"RETURNING {TASK_COLUMNS}"
        )

    @cached_property
    def peek_pending_per_tenant(self) -> str:
        # No LATERAL in SQLite: each tenant's head is a correlated list of row ids, looked up one by one.
        return (
            f"{self.pending_tenants} SELECT {TASK_COLUMNS} FROM tenants CROSS JOIN tasks "
            f"WHERE tasks.seq IN ({self.tenant_head('seq')})"
        )


SQL = SQLiteStatements()


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


class SQLiteStore(SqlStore):
    """The :class:`~comfyfleet.store.base.Store` on one SQLite file (``sqlite:///path.db``)."""

    sql = SQL
    codec = CODEC

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = _path_from_url(url)
        self._writer = ConnectionThread(self.path, name="comfyfleet-sqlite-writer", grouped=True)
        self._reader = ConnectionThread(self.path, name="comfyfleet-sqlite-reader", grouped=False)
        self._inline = InlineConnection(self.path)
        self._checkpoints = Background()
        self._next_checkpoint = CHECKPOINT_EVERY
        self.busy_fallbacks = 0  # writes that found SQLite's lock taken and went to the writer thread
        self._hub = NotificationHub()
        self._state = "new"

    @property
    def write_stats(self) -> tuple[int, int]:
        """``(writes, commits)`` of the writer thread so far: how many writes each group commit carried."""
        return self._writer.grouped_writes, self._writer.group_commits

    @property
    def inline_stats(self) -> tuple[int, int]:
        """``(writes, commits)`` on the event loop's connection so far."""
        return self._inline.writes, self._inline.commits

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
            self._inline.open()
        except sqlite3.Error as exc:
            await self._writer.stop()
            await self._reader.stop()
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state != "open":
            return
        self._state = "closed"
        self._hub.close()
        self._inline.close()
        # The writer finishes what is queued before it stops, so no accepted write is dropped.
        await self._writer.stop()
        await self._reader.stop()
        await self._checkpoints.settle()

    def _is_open(self) -> bool:
        return self._state == "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreClosed(f"the SQLite store is {self._state}; use it inside 'async with'")

    # -- the seam of the shared store -----------------------------------------------------------
    async def _read(self, sql: str, params: dict[str, Any]) -> list[Row]:
        sql, params = _bind_lists(sql, params)
        job = _statement(sql, params)
        self._check_open()
        try:
            return self._inline.read(job)
        except Busy:
            return await self._run(self._reader, job)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    async def _write(self, sql: str, params: dict[str, Any]) -> list[Row]:
        sql, params = _bind_lists(sql, params)
        job = _statement(sql, params)
        self._check_open()
        try:
            rows = await self._inline.write(job)
        except Busy:
            self.busy_fallbacks += 1
            return await self._run(self._writer, job)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if self._inline.commits >= self._next_checkpoint:
            self._next_checkpoint = self._inline.commits + CHECKPOINT_EVERY
            self._checkpoint_soon()
        return rows

    async def _read_long(self, sql: str, params: dict[str, Any]) -> list[Row]:
        sql, params = _bind_lists(sql, params)
        return await self._run(self._reader, _statement(sql, params))

    async def _write_long(self, sql: str, params: dict[str, Any]) -> list[Row]:
        sql, params = _bind_lists(sql, params)
        return await self._run(self._writer, _statement(sql, params))

    def _checkpoint_soon(self) -> None:
        """Copy the WAL back into the database file on the writer thread (the loop's connection never does)."""

        async def checkpoint() -> None:
            try:
                await self._run(self._writer, _checkpoint, exclusive=True)
            except StoreError as exc:  # the next one tries again
                logger.debug("sqlite_checkpoint_failed error=%s", exc)

        self._checkpoints.start(checkpoint())

    async def _run(
        self, thread: ConnectionThread, job: Callable[[sqlite3.Connection], T], *, exclusive: bool = False
    ) -> T:
        self._check_open()
        try:
            return await thread.run(job, exclusive=exclusive)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "no such table" in text:
            return StoreUnavailable(f"the SQLite store {self.path} is not migrated: run 'comfyfleet migrate'")
        if isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorname in _KEY_TAKEN:
            return Conflict(f"SQLite store {self.path}: {text}")
        if isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailable(f"SQLite store {self.path} is unavailable: {text}")
        return StoreError(f"SQLite store {self.path}: {text}")

    # -- coordination ---------------------------------------------------------------------------
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
                            (migration.version, migration.name, _dump_time(utcnow())),
                        )
                        applied.append(migration.version)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return applied

        applied = await self._run(self._writer, apply, exclusive=True)
        if applied:
            logger.info("store_migrated backend=sqlite versions=%s", applied)
        return applied

    async def notify(self, channel: str, payload: str = "") -> None:
        self._check_open()
        self._hub.publish(Notification(channel, payload))

    def listen(self) -> Subscription:
        self._check_open()
        return self._hub.subscribe()

    async def try_leader(self, name: str) -> bool:
        self._check_open()
        return True  # one replica per SQLite file: it leads everything


def _statement(sql: str, params: dict[str, Any]) -> Callable[[sqlite3.Connection], list[Row]]:
    return lambda conn: conn.execute(sql, params).fetchall()


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


# A unique key already taken: the one integrity error that is the caller's to decide about.
_KEY_TAKEN = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


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
