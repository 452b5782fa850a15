"""The SQLite store's connection on the event loop's own thread, for the short statements that are nearly all of
its work: a submission, a claim, an attempt's writes, a task read by its id.

Such a statement costs SQLite a few microseconds; handing it to a connection thread and back costs about 75 µs
of CPU and as much again in wall time (two thread wake-ups and the GIL changing hands), several times per task.
So the store runs a statement here first. Reads run at once. Writes are committed in groups, as on the writer
thread: those asked for during one turn of the event loop go in one transaction at the start of the next (each
in a savepoint, so one that fails is undone alone), and each caller is answered once the group is committed
(a burst of submissions costs one commit, not one each, and a lone write waits for no thread). It never
waits on the loop:

* not for SQLite's lock: the connection's busy timeout is 0, so a statement that finds the lock taken (the
  writer thread migrating, another process writing the file) raises :class:`Busy` at once, and the store runs
  it on its threads, which wait for the lock;
* not for a checkpoint: automatic checkpoints are off here, and the store asks the writer thread for a passive
  one every ``CHECKPOINT_EVERY`` commits (so the WAL file stays small without the loop copying it back).

Statements that may run long (a page of a listing, a purge) always go to the threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from comfyfleet.store._sqlite_threads import MAX_GROUP, deliver, run_group
from comfyfleet.store.base import StoreClosed

T = TypeVar("T")

CHECKPOINT_EVERY = 500
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class Busy(Exception):
    """The statement would have to wait for SQLite's lock: run it where waiting is allowed."""


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY_CODES


class InlineConnection:
    """One SQLite connection, used only on the thread that opened it (the event loop's)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._queued: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self.commits = 0
        self.writes = 0

    def open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, cached_statements=256)
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA synchronous = NORMAL")  # per connection; as the writer thread's (WAL)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed("the SQLite store is not open")
        return self._conn

    def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return job(self.connection)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise Busy from exc
            raise

    def write(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """``job`` in the group committed at the start of the loop's next turn: its result once committed, or its
        error (:class:`Busy` when the group could not take SQLite's lock; nothing of it is then stored)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((job, future))
        if len(self._queued) == 1:
            loop.call_soon(self._commit_queued)
        return future

    def _commit_queued(self) -> None:
        while self._queued:
            group, self._queued = self._queued[:MAX_GROUP], self._queued[MAX_GROUP:]
            try:
                results = run_group(self.connection, [job for job, _ in group])
            except (sqlite3.Error, StoreClosed) as exc:
                busy = isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)
                deliver([(future, None, Busy() if busy else exc) for _, future in group])
                continue
            self.commits += 1
            self.writes += len(group)
            deliver([(future, *outcome) for (_, future), outcome in zip(group, results, strict=True)])
