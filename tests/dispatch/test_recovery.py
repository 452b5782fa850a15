"""Nothing accepted is lost and nothing runs twice: kill -9 mid-flight, and two replicas on one PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from comfyfleet.emulators.comfyui.options import EmulatorOptions
from support import ServeProcess, emulators, eventually

from .service import executions, queue_metrics, read_tasks, serve_config, submit_all

# Enough for both replicas to claim side by side for seconds on end, all four workers busy: a task claimed
# twice, or a prompt sent twice, would show in the counts. (Ten times as many proved nothing more and took a
# third of the suite's time.)
REPLICA_TASKS = 400


@pytest.mark.slow
async def test_kill_9_with_200_tasks_in_flight_loses_none_and_runs_none_twice(tmp_path: Path) -> None:
    options = EmulatorOptions(prompt_time_s=0.03)
    async with emulators(options, options) as workers, httpx.AsyncClient(timeout=30) as http:
        server = ServeProcess(tmp_path, config=serve_config(tmp_path, [worker.url for worker in workers]))
        server.start()
        try:
            await server.wait_ready()
            ids = await submit_all(http, [server.url], 200)
            await eventually(
                lambda: queue_metrics(http, server.url),
                until=lambda m: m["completed_tasks"] >= 30,
                within=30,
                what="first completions",
            )
            server.kill()
            in_flight = 200 - sum(executions(workers).values())
            assert in_flight > 0
            server.start()
            await server.wait_ready()
            await eventually(
                lambda: queue_metrics(http, server.url),
                until=lambda m: m["pending_tasks"] == 0 and m["running_tasks"] == 0,
                within=60,
                what="every task ending after the restart",
            )
            tasks = await read_tasks(http, server.url, ids)
        finally:
            await server.stop_in_thread()
        assert Counter(task["status"] for task in tasks) == {"completed": 200}
        counts = executions(workers)
        # Every task ran exactly once, under the prompt id the store has for it, and nothing else ran.
        assert all(counts[task["prompt_id"]] == 1 for task in tasks)
        assert sum(counts.values()) == 200
        assert sum(worker.stats.prompts_accepted for worker in workers) == 200


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(200)
async def test_two_replicas_on_postgres_complete_every_task_exactly_once(
    tmp_path: Path, postgres_url: str
) -> None:
    async with (
        emulators(*(EmulatorOptions() for _ in range(4))) as workers,
        httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as http,
    ):
        urls = [worker.url for worker in workers]
        replicas = [
            ServeProcess(
                tmp_path,
                config=serve_config(tmp_path, urls, store=postgres_url, replica_id=f"replica-{n}"),
                name=f"replica-{n}",
            )
            for n in range(2)
        ]
        for replica in replicas:
            replica.start()
        try:
            for replica in replicas:
                await replica.wait_ready()
            ids = await submit_all(http, [replica.url for replica in replicas], REPLICA_TASKS, concurrency=32)
            await eventually(
                lambda: queue_metrics(http, replicas[0].url),
                until=lambda m: m["pending_tasks"] == 0 and m["running_tasks"] == 0,
                within=120,
                what=f"{REPLICA_TASKS} tasks ending",
                interval=0.2,
            )
            tasks = await read_tasks(http, replicas[1].url, ids)
        finally:
            await asyncio.gather(*(replica.stop_in_thread() for replica in replicas))
        assert Counter(task["status"] for task in tasks) == {"completed": REPLICA_TASKS}
        counts = executions(workers)
        assert all(counts[task["prompt_id"]] == 1 for task in tasks)
        assert sum(counts.values()) == REPLICA_TASKS
        # No prompt was submitted twice, and both replicas dispatched.
        assert sum(worker.stats.prompts_accepted for worker in workers) == REPLICA_TASKS
        owners = Counter(task["attempts"][-1]["owner"] for task in tasks)
        assert set(owners) == {"replica-0", "replica-1"}, owners
