"""A task's model files in the store, on both backends, and the SQLite upgrade (migration 0007 rebuilds the
tasks table to allow the phase ``fetching_models``) keeping every row, index, trigger and the seq."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from comfyfleet.domain import NewTask, TaskPhase
from comfyfleet.store import Lease, Store, open_store
from comfyfleet.store._common import load_migrations

MODELS = [
    {
        "url": "https://example.com/a.safetensors",
        "sha256": "a" * 64,
        "folder": "loras",
        "name": "a.safetensors",
    }
]


async def test_a_task_keeps_its_models_and_may_be_fetching_them(store: Store) -> None:
    task, _ = await store.create_task(NewTask(payload={"1": {}}, models=MODELS))
    assert task.models == MODELS
    [claimed] = await store.claim_ids("owner-a", 30.0, [task.id])
    lease = Lease(claimed.id, claimed.attempt, "owner-a")
    fetching = await store.set_phase(lease, TaskPhase.FETCHING_MODELS)
    assert fetching.phase is TaskPhase.FETCHING_MODELS
    read = await store.get_task(task.id)
    assert read.models == MODELS
    assert read.phase is TaskPhase.FETCHING_MODELS
    listed = (await store.list_tasks(limit=5)).tasks
    assert listed[0].models == MODELS


async def test_the_sqlite_upgrade_keeps_the_tasks_their_order_indexes_and_webhook_trigger(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    before = [migration for migration in load_migrations("sqlite") if migration.version < 7]
    for migration in before:
        connection.executescript(migration.sql)
        connection.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, '2026-01-01T00:00:00.000000+00:00')",
            (migration.version, migration.name),
        )
    indexes_before = _names(connection, "index")
    now = "2026-01-01T00:00:00.000000+00:00"
    for task_id, webhook in [("task-1", '{"url": "https://example.com/hook"}'), ("task-2", None)]:
        connection.execute(
            "INSERT INTO tasks (id, tenant, priority, status, payload, created_at, updated_at, max_retries, "
            "timeout_s, webhook) VALUES (?, 'default', 0, 'pending', '{}', ?, ?, 3, 60.0, ?)",
            (task_id, now, now, webhook),
        )
    highest = connection.execute("SELECT max(seq) FROM tasks").fetchone()[0]
    connection.execute("DELETE FROM tasks WHERE id = 'task-2'")  # the highest seq is gone
    connection.close()
    async with open_store(f"sqlite:///{path}") as store:
        later = [migration.version for migration in load_migrations("sqlite") if migration.version >= 7]
        assert await store.migrate() == later
        kept = await store.get_task("task-1")
        assert kept.webhook == {"url": "https://example.com/hook"}
        assert kept.models is None
        third, _ = await store.create_task(NewTask(payload={"3": {}}, models=MODELS))
        assert third.seq > highest  # seq never goes back, even past a deleted task
        [claimed] = await store.claim_ids("owner", 30.0, ["task-1"])
        await store.fail_task(
            Lease(claimed.id, claimed.attempt, "owner"), "model gone", "model_unavailable", None
        )
    connection = sqlite3.connect(path)
    assert indexes_before <= _names(connection, "index")  # later migrations may add their own
    assert "tasks_webhook_outbox" in _names(connection, "trigger")
    deliveries = connection.execute("SELECT task_id, event FROM webhook_deliveries").fetchall()
    assert deliveries == [("task-1", "task.failed")]
    connection.close()


def _names(connection: sqlite3.Connection, kind: str) -> set[str]:
    rows = connection.execute(
        "SELECT name FROM sqlite_master WHERE type = ? AND name NOT LIKE 'sqlite_%'", (kind,)
    ).fetchall()
    return {name for (name,) in rows}
