"""Nothing accepted is lost and nothing runs twice: kill -9 mid-flight, and two replicas on one PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from comfyfleet.emulators.comfyui.options import EmulatorOptions

from .service import (
    ServeProcess,
    emulators,
    executions,
    poll_until,
    queue_metrics,
    read_tasks,
    serve_config,
    submit_all,
)


@pytest.mark.slow
async def test_kill_9_with_200_tasks_in_flight_loses_none_and_runs_none_twice(tmp_path: Path) -> None:
    options = EmulatorOptions(prompt_time_s=0.03)
    async with emulators(options, options) as workers, httpx.AsyncClient(timeout=30) as http:
        server = ServeProcess(tmp_path, serve_config(tmp_path, [worker.url for worker in workers]))
        server.start()
        try:
            await server.wait_ready(http)
            ids = await submit_all(http, [server.url], 200)
            await poll_until(
                lambda: queue_metrics(http, server.url),
                lambda m: m["completed_tasks"] >= 30,
                timeout_s=30,
                what="first completions",
            )
            server.kill()
            in_flight = 200 - (await asyncio.sleep(0, sum(executions(workers).values())))
            assert in_flight > 0
            server.start()
            await server.wait_ready(http)
            await poll_until(
                lambda: queue_metrics(http, server.url),
                lambda m: m["pending_tasks"] == 0 and m["running_tasks"] == 0,
                timeout_s=60,
                what="every task ending after the restart",
            )
            tasks = await read_tasks(http, server.url, ids)
        finally:
            server.stop()
        assert Counter(task["status"] for task in tasks) == {"completed": 200}
        counts = executions(workers)
        # Every task ran exactly once, under the prompt id the store has for it, and nothing else ran.
        assert all(counts[task["prompt_id"]] == 1 for task in tasks)
        assert sum(counts.values()) == 200
        assert sum(worker.stats.prompts_accepted for worker in workers) == 200


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(400)
async def test_two_replicas_on_postgres_complete_2000_tasks_exactly_once(
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
                serve_config(tmp_path, urls, store=postgres_url, replica_id=f"replica-{n}"),
                name=f"replica-{n}",
            )
            for n in range(2)
        ]
        for replica in replicas:
            replica.start()
        try:
            for replica in replicas:
                await replica.wait_ready(http)
            ids = await submit_all(http, [replica.url for replica in replicas], 2000, concurrency=32)
            await poll_until(
                lambda: queue_metrics(http, replicas[0].url),
                lambda m: m["pending_tasks"] == 0 and m["running_tasks"] == 0,
                timeout_s=240,
                what="2,000 tasks ending",
                every_s=0.5,
            )
            tasks = await read_tasks(http, replicas[1].url, ids)
        finally:
            for replica in replicas:
                replica.stop()
        assert Counter(task["status"] for task in tasks) == {"completed": 2000}
        counts = executions(workers)
        assert all(counts[task["prompt_id"]] == 1 for task in tasks)
        assert sum(counts.values()) == 2000
        # No prompt was submitted twice, and both replicas dispatched.
        assert sum(worker.stats.prompts_accepted for worker in workers) == 2000
        owners = Counter(task["attempts"][-1]["owner"] for task in tasks)
        assert set(owners) == {"replica-0", "replica-1"}, owners
