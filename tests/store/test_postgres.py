"""What only PostgreSQL does: several processes and replicas on one database."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import asyncpg
import pytest

from comfyfleet.domain import NewTask
from comfyfleet.store import StoreUnavailable, open_store
from comfyfleet.store._common import load_migrations
from comfyfleet.store.postgres import PostgresStore
from support import eventually

pytestmark = pytest.mark.postgres

CLAIMER = Path(__file__).with_name("claimer.py")
ALL_VERSIONS = [migration.version for migration in load_migrations("postgres")]


async def seed_tasks(url: str, count: int) -> list[str]:
    """Insert ``count`` pending tasks in one statement (random priorities), in seq order; return their ids."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "INSERT INTO tasks (id, tenant, priority, status, payload, created_at, updated_at, max_retries, timeout_s) "
            "SELECT gen_random_uuid()::text, 'default', (random() * 4)::int, 'pending', '{}'::jsonb, now(), now(), 3, 60 "
            "FROM generate_series(1, $1) RETURNING id",
            count,
        )
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def start_claimer(url: str, owner: str, seed: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLAIMER),
        url,
        owner,
        str(seed),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == b"ready"
    return process


@pytest.mark.slow
async def test_two_processes_claim_every_task_exactly_once(postgres_url: str) -> None:
    expected = set(await seed_tasks(postgres_url, 5000))
    claimers = [await start_claimer(postgres_url, f"process-{n}", seed=n) for n in range(2)]
    for process in claimers:  # both are connected and waiting: release them together
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
    outputs = await asyncio.wait_for(asyncio.gather(*(process.communicate() for process in claimers)), 90)
    assert [process.returncode for process in claimers] == [0, 0]
    claimed = [json.loads(stdout) for stdout, _ in outputs]

    every = claimed[0] + claimed[1]
    assert len(every) == len(set(every)) == 5000, "a task was claimed twice"
    assert set(every) == expected, "a task was left behind"
    assert all(claimed), "one process got nothing: the claims did not run concurrently"

    async with open_store(postgres_url) as store:
        metrics = await store.queue_metrics()
        assert (metrics.pending_tasks, metrics.running_tasks) == (0, 5000)
        conn = await asyncpg.connect(postgres_url)
        try:
            order = {
                row["id"]: (row["priority"], row["seq"], row["attempt"])
                for row in await conn.fetch("SELECT id, priority, seq, attempt FROM tasks")
            }
        finally:
            await conn.close()
    assert {attempt for _, _, attempt in order.values()} == {1}
    for ids in claimed:
        # Each claimer only ever moves down the queue: a task it skipped would show up out of order.
        keys = [(-order[task_id][0], order[task_id][1]) for task_id in ids]
        assert keys == sorted(keys)


async def test_notifications_cross_store_instances(postgres_url: str) -> None:
    async with open_store(postgres_url) as sender, open_store(postgres_url) as receiver:
        heard_by_receiver = receiver.listen()
        heard_by_sender = sender.listen()
        await sender.notify("task:42", '{"status": "completed"}')
        got = await asyncio.wait_for(anext(heard_by_receiver), 10)
        assert (got.channel, got.payload) == ("task:42", '{"status": "completed"}')
        # The sender's own listeners hear it once: at once, not again when PostgreSQL echoes it back.
        await receiver.notify("tasks", "")
        own = await asyncio.wait_for(anext(heard_by_sender), 10)
        echoed_or_next = await asyncio.wait_for(anext(heard_by_sender), 10)
        assert (own.channel, echoed_or_next.channel) == ("task:42", "tasks")


async def test_listener_reconnects_after_its_connection_is_killed(postgres_url: str) -> None:
    async with open_store(postgres_url) as sender, open_store(postgres_url) as receiver:
        heard = receiver.listen()
        admin = await asyncpg.connect(postgres_url)
        try:
            database = postgres_url.rsplit("/", 1)[1]
            listening_pids = [
                row["pid"]
                for row in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'", database
                )
            ]
            assert listening_pids
            for pid in listening_pids:
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()

        # Wake-ups sent while the listener is away are lost by design; keep sending until one arrives.
        async def heard_after_reconnect() -> bool:
            await sender.notify("tasks", "after-reconnect")
            try:
                got = await asyncio.wait_for(anext(heard), 0.5)
            except TimeoutError:
                return False
            assert got.payload == "after-reconnect"
            return True

        await eventually(heard_after_reconnect, within=30, what="the listener coming back")


async def test_leadership_is_exclusive_and_passes_on_when_the_leader_leaves(postgres_url: str) -> None:
    async with open_store(postgres_url) as first, open_store(postgres_url) as second:
        assert await first.try_leader("autoscaler")
        assert not await second.try_leader("autoscaler")
        assert await first.try_leader("autoscaler")  # keeps holding
        assert await second.try_leader("reaper")  # another name is another lock
        assert not await first.try_leader("reaper")
        await first.__aexit__(None, None, None)
        assert await second.try_leader("autoscaler")


async def test_unreachable_server_is_reported_clearly() -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = PostgresStore(f"postgresql://postgres:secret@127.0.0.1:{port}/nothing", connect_timeout_s=2)
    with pytest.raises(StoreUnavailable, match="cannot reach PostgreSQL") as raised:
        await store.__aenter__()
    assert "secret" not in str(raised.value)


async def test_not_ready_until_migrated(empty_postgres_url: str) -> None:
    async with open_store(empty_postgres_url) as store:
        assert not await store.is_ready()
        with pytest.raises(StoreUnavailable, match="not migrated"):
            await store.get_task("x")
        assert await store.migrate() == ALL_VERSIONS
        assert await store.is_ready()


async def test_concurrent_migrations_apply_each_version_once(empty_postgres_url: str) -> None:
    async with open_store(empty_postgres_url) as first, open_store(empty_postgres_url) as second:
        applied = await asyncio.gather(first.migrate(), second.migrate())
        assert sorted(applied) == [[], ALL_VERSIONS]


async def test_a_vanished_database_makes_the_store_unready_and_unavailable(
    postgres_url: str, postgres_admin_url: str
) -> None:
    async with open_store(postgres_url) as store:
        assert await store.is_ready()
        admin = await asyncpg.connect(postgres_admin_url)
        try:
            await admin.execute(f'DROP DATABASE "{postgres_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await admin.close()
        assert not await store.is_ready()
        with pytest.raises(StoreUnavailable):
            await store.create_task(NewTask(payload={}))


async def test_closing_does_not_wait_for_a_stuck_query(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, close_timeout_s=0.2)
    await store.__aenter__()
    started = asyncio.Event()

    async def sleep_in_the_database() -> None:
        async with store._connection() as conn:
            started.set()
            await conn.execute("SELECT pg_sleep(60)")

    async def stuck_query() -> None:
        with pytest.raises(StoreUnavailable, match="closed in the middle"):
            await sleep_in_the_database()

    async with asyncio.TaskGroup() as group:
        group.create_task(stuck_query())
        await started.wait()
        # Closing gives up waiting for the borrowed connection and cuts it: the query fails, the close ends.
        await asyncio.wait_for(store.__aexit__(None, None, None), 10)


def test_named_parameters_are_numbered_once_each_and_casts_are_left_alone() -> None:
    from comfyfleet.store.postgres import numbered

    text, names = numbered("SELECT :a::text, CAST(:b AS TEXT[]), :a WHERE x = ':literal' OR y = :b_2")
    assert text == "SELECT $1::text, CAST($2 AS TEXT[]), $1 WHERE x = ':literal' OR y = $3"
    assert names == ("a", "b", "b_2")
