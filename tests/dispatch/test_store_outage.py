"""A store that stops answering mid-run never strands a task (issue 9): PostgreSQL killed and restarted, and
a SQLite file whose disk is full for a while. Every task ends completed, each prompt ran once, and the queue
drains by itself once the store is back."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfyfleet.domain import NewTask
from comfyfleet.emulators.comfyui.options import EmulatorOptions
from comfyfleet.emulators.comfyui.server import EmulatorServer
from comfyfleet.store import Store, StoreUnavailable
from support import ServeProcess, emulators, eventually, running_fleet, tiny_workflow

from .pg_cluster import PrivateCluster
from .service import executions, read_tasks, serve_config, submit_all

OUTAGE_S = 6.0
DRAIN_S = 60.0


async def _queue_counts(http: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    """Queue metrics, or None while the service answers 503 (its store is still coming back)."""
    try:
        response = await http.get(f"{url}/api/v1/queue/metrics")
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    counts: dict[str, Any] = response.json()
    return counts


def _finished(workers: list[EmulatorServer]) -> int:
    return sum(worker.stats.prompts_succeeded for worker in workers)


def _drained(counts: dict[str, Any] | None) -> bool:
    return counts is not None and counts["pending_tasks"] == 0 and counts["running_tasks"] == 0


def _assert_each_completed_once(tasks: list[dict[str, Any]], counts: Counter[str], total: int) -> None:
    assert Counter(task["status"] for task in tasks) == {"completed": total}, [
        (task["id"], task["status"], task.get("phase"), task.get("error"))
        for task in tasks
        if task["status"] != "completed"
    ][:10]
    # Each task's prompt ran once, under the id the store has for it, and nothing else ran.
    assert all(counts[task["prompt_id"]] == 1 for task in tasks)
    assert sum(counts.values()) == total


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgres_killed_for_six_seconds_strands_no_task(
    tmp_path: Path, private_postgres: PrivateCluster
) -> None:
    total = 300
    options = EmulatorOptions(prompt_time_s=0.05)
    async with emulators(options, options, options) as workers, httpx.AsyncClient(timeout=30) as http:
        urls = [worker.url for worker in workers]
        config = serve_config(tmp_path, urls, store=private_postgres.url, replica_id="replica-0")
        server = ServeProcess(tmp_path, config=config)
        server.start()
        try:
            await server.wait_ready()
            ids = await submit_all(http, [server.url], total)
            await eventually(
                lambda: _queue_counts(http, server.url),
                until=lambda counts: counts is not None and counts["completed_tasks"] >= 40,
                within=60,
                what="first completions",
            )
            finished_before = _finished(workers)
            private_postgres.stop_immediately()
            await asyncio.sleep(OUTAGE_S)  # the outage itself: prompts in flight finish meanwhile
            assert _finished(workers) > finished_before, "no prompt was in flight"
            private_postgres.start()
            back_at = time.monotonic()
            await eventually(
                lambda: _queue_counts(http, server.url),
                until=_drained,
                within=DRAIN_S,
                what="the queue draining after PostgreSQL came back",
                interval=0.2,
            )
            drained_in = time.monotonic() - back_at
            tasks = await read_tasks(http, server.url, ids)
        finally:
            await server.stop_in_thread()
        _assert_each_completed_once(tasks, executions(workers), total)
        assert drained_in < DRAIN_S


async def _limit_pages(store: Store, pages: int | None) -> int:
    """SQLite's own size limit, ``PRAGMA max_page_count``, on the store's connections that write (the limit is
    per connection, so it must be those: the event loop's and the writer thread's): a write that needs a new page
    then fails with SQLITE_FULL, "database or disk is full", exactly as on a full disk. ``None`` sets it to the
    file's current size."""

    def apply(conn: sqlite3.Connection) -> int:
        limit = pages if pages is not None else conn.execute("PRAGMA page_count").fetchone()[0]
        return int(conn.execute(f"PRAGMA max_page_count = {int(limit)}").fetchone()[0])

    # The one test hook: the store's own connections.
    apply(store._inline.connection)  # type: ignore[attr-defined]
    return int(await store._writer.run(apply, exclusive=True))  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sqlite_disk_full_for_a_while_strands_no_task(tmp_path: Path) -> None:
    total = 120
    options = EmulatorOptions(prompt_time_s=0.1)
    async with (
        emulators(options, options) as workers,
        running_fleet(tmp_path, workers=[worker.url for worker in workers], dispatch={"lease_s": 2.0}) as svc,
    ):
        ids = [(await svc.submit(tiny_workflow(color=n)))["id"] for n in range(total)]
        await eventually(
            lambda: _queue_counts(svc.http, svc.url),
            until=lambda counts: counts is not None and counts["completed_tasks"] >= 20,
            within=60,
            what="first completions",
        )
        store = svc.runtime.store
        # The disk fills while prompts run on the workers.
        in_flight = await eventually(
            lambda: sum(worker.stats.prompts_accepted for worker in workers),
            until=lambda accepted: accepted > _finished(workers),
            within=30,
            what="a prompt in flight",
            interval=0.005,
        )
        await _limit_pages(store, None)
        # The disk is full: nothing that needs room can be stored.
        with pytest.raises(StoreUnavailable, match="full"):
            await store.create_task(NewTask(payload={"x": {"class_type": "y" * 20_000, "inputs": {}}}))
        # The prompts in flight finish on their workers while their results cannot be written.
        await eventually(
            lambda: _finished(workers),
            until=lambda finished: finished >= in_flight,
            within=30,
            what="the prompts in flight finishing while the disk is full",
        )
        await _limit_pages(store, 1_073_741_823)
        await eventually(
            lambda: _queue_counts(svc.http, svc.url),
            until=_drained,
            within=DRAIN_S,
            what="the queue draining after the disk has room again",
            interval=0.2,
        )
        tasks = [await svc.task(task_id) for task_id in ids]
    _assert_each_completed_once(tasks, executions(workers), total)
