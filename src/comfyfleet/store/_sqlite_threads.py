"""The SQLite store's connections: each owned by one thread of its own, fed jobs in submission order.

The writer groups its jobs: all the writes queued while the previous commit ran are applied in one
transaction (each inside a savepoint, so one failing write does not undo its neighbours) and answered
together once the commit is done. A caller is answered only after its write is committed, so nothing a
caller was told is stored can be lost when the process dies. The reader runs each job on its own.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from comfyfleet.store.base import StoreClosed

T = TypeVar("T")

# Enough to amortise one commit over a burst, small enough that one group never holds the lock for long.
MAX_GROUP = 512


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


def deliver(outcomes: list[_Outcome]) -> None:
    """Answer each caller with its result or error (unless it gave up waiting)."""
    for future, result, error in outcomes:
        if future.done():  # the caller gave up waiting; the write itself stands
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class ConnectionThread:
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
            self._loop.call_soon_threadsafe(deliver, outcomes)

    @staticmethod
    def _run_alone(conn: sqlite3.Connection, job: _Job[Any]) -> _Outcome:
        try:
            return (job.future, job.fn(conn), None)
        except Exception as exc:
            return (job.future, None, exc)

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> list[_Outcome]:
        try:
            results = run_group(conn, [job.fn for job in group])
        except sqlite3.Error as exc:
            # Nothing of this group is durable: every caller hears the failure, none is told "stored".
            return [(job.future, None, exc) for job in group]
        self.group_commits += 1
        self.grouped_writes += len(group)
        return [(job.future, result, error) for job, (result, error) in zip(group, results, strict=True)]


def run_group(
    conn: sqlite3.Connection, jobs: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[Any, Exception | None]]:
    """``jobs`` in one transaction, each inside a savepoint (one that raises is undone alone), committed once:
    each job's result or error. Raises ``sqlite3.Error`` when the transaction itself fails (nothing is stored)."""
    conn.execute("BEGIN IMMEDIATE")
    results: list[tuple[Any, Exception | None]] = []
    try:
        for job in jobs:
            conn.execute("SAVEPOINT job")
            try:
                result = job(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                results.append((None, exc))
            else:
                conn.execute("RELEASE job")
                results.append((result, None))
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
