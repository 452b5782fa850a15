"""What only the SQLite store does: its file, its single writer and its group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from comfyfleet.domain import NewTask, TaskStatus
from comfyfleet.store import InvalidArgument, StoreClosed, StoreUnavailable, open_store
from comfyfleet.store._common import load_migrations
from comfyfleet.store.sqlite import SQLiteStore
from support import eventually

ALL_VERSIONS = [migration.version for migration in load_migrations("sqlite")]


def task(priority: int = 0, key: str | None = None) -> NewTask:
    return NewTask(payload={"1": {"class_type": "X", "inputs": {}}}, priority=priority, idempotency_key=key)


@pytest.mark.parametrize("url", ["sqlite://relative.db", "sqlite:///", "sqlite:///:memory:"])
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(InvalidArgument, match="SQLite store URL"):
        SQLiteStore(url)


def test_relative_and_absolute_paths(tmp_path: Path) -> None:
    assert SQLiteStore("sqlite:///data/queue.db").path == "data/queue.db"
    assert SQLiteStore(f"sqlite:///{tmp_path}/queue.db").path == f"{tmp_path}/queue.db"


async def test_wal_mode_and_migrations(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "queue.db"
    async with open_store(f"sqlite:///{path}") as store:
        assert not await store.is_ready()
        with pytest.raises(StoreUnavailable, match="not migrated"):
            await store.create_task(task())
        assert await store.migrate() == ALL_VERSIONS
        assert await store.is_ready()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        applied = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [version for (version,) in applied] == ALL_VERSIONS


async def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StoreUnavailable, match="cannot open SQLite store"):
        await SQLiteStore(f"sqlite:///{tmp_path / 'a-directory.db'}").__aenter__()


async def test_use_outside_the_context_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(StoreClosed):
        await store.get_task("x")
    async with store:
        await store.migrate()
        listener = store.listen()
    with pytest.raises(StoreClosed):
        await store.create_task(task())
    with pytest.raises(StopAsyncIteration):  # closing the store ends its listeners
        await anext(listener)
    assert not await store.is_ready()


async def test_concurrent_writes_are_committed_together_on_the_loop_and_all_survive(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    async with open_store(url) as store:
        await store.migrate()
        assert isinstance(store, SQLiteStore)
        writes_before, commits_before = store.inline_stats
        created = await asyncio.gather(*(store.create_task(task(n % 3)) for n in range(2000)))
        writes, commits = store.inline_stats
        assert writes - writes_before == 2000  # no thread hop: committed on the loop's own connection
        assert commits - commits_before < 500, "concurrent writes were not grouped into shared commits"
        # One bad write fails alone; its neighbours are stored.
        mixed = await asyncio.gather(
            store.create_task(task(key="a")),
            store.cancel_task("no-such-task"),
            store.create_task(task(key="b")),
            return_exceptions=True,
        )
    assert [type(result).__name__ for result in mixed] == ["tuple", "NotFound", "tuple"]
    seqs = [created_task.seq for created_task, _ in created]
    assert len(set(seqs)) == 2000
    async with open_store(url) as reopened:
        metrics = await reopened.queue_metrics()
        assert metrics.pending_tasks == 2002
        for created_task, _ in created[::250]:
            assert (await reopened.get_task(created_task.id)).status is TaskStatus.PENDING


async def test_a_write_that_finds_the_lock_taken_waits_on_the_writer_thread(tmp_path: Path) -> None:
    """The loop never waits for SQLite's lock: a write that finds it held (here by another connection, as
    another process would) goes to the writer thread, which waits for it; the caller is answered once stored."""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    async with open_store(url) as store:
        await store.migrate()
        assert isinstance(store, SQLiteStore)
        other = sqlite3.connect(tmp_path / "queue.db", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # the write lock, held
        writes_before, inline_before = store.write_stats[0], store.inline_stats
        submitting = asyncio.ensure_future(store.create_task(task(key="waits")))
        await eventually(lambda: store.busy_fallbacks == 1, what="the write handed to the writer thread")
        assert not submitting.done()
        other.execute("ROLLBACK")
        created, _ = await submitting
        other.close()
        assert store.write_stats[0] == writes_before + 1
        assert store.inline_stats == inline_before
        assert (await store.get_task(created.id)).status is TaskStatus.PENDING


def test_migration_scripts_split_where_sqlite_ends_a_statement() -> None:
    from comfyfleet.store.sqlite import _split_statements

    script = """-- a comment; with a semicolon
CREATE TABLE a (x TEXT DEFAULT 'semi;colon');
CREATE TRIGGER t AFTER INSERT ON a BEGIN
    INSERT INTO a VALUES ('x');
    INSERT INTO a VALUES ('y');
END;
-- trailing comment
"""
    statements = _split_statements(script)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER")
    assert statements[1].endswith("END;")
    with pytest.raises(ValueError, match="ends inside a statement"):
        _split_statements("CREATE TABLE b (x TEXT)")


def test_a_list_parameter_is_bound_one_placeholder_per_item() -> None:
    from comfyfleet.store.sqlite import _bind_lists

    sql, params = _bind_lists("SELECT 1 WHERE id IN (:ids) AND x = :x", {"ids": ("a", "b"), "x": 1})
    assert sql == "SELECT 1 WHERE id IN (:ids_0, :ids_1) AND x = :x"
    assert params == {"ids_0": "a", "ids_1": "b", "x": 1}
    assert _bind_lists("SELECT :x", {"x": 1}) == ("SELECT :x", {"x": 1})
