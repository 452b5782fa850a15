"""Two replicas on one PostgreSQL against one (issue 11), side by side in one run.

8 emulator workers with zero execution time (each its own process) serve a static pool. One run: one
``comfyfleet serve`` on a fresh database; the other: two, on another fresh database, sharing the queue and the
workers. Each run submits ``--tasks`` trivial tasks through ``POST /api/v1/tasks`` (32 at a time, spread over
the replicas) and waits until every one completed. Printed: tasks per second from the first submission to the
last completion, each replica's CPU per task (from its own process counters), the PostgreSQL server's CPU per
task (its processes on this machine, so other users of that server count too), and the ratio two / one.

    .venv/bin/python bench/scale_out.py [--quick] [--tasks 2000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _harness import emulator_processes, service_process, tiny_graph
from submit import fresh_postgres_database

WORKERS = 8


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes on this machine (readable ones)."""
    pids = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in ("postgres", "postmaster"):
            pids.append(process.pid)
    return pids


async def drive(urls: list[str], tasks: int) -> float:
    """Submit ``tasks`` tasks (32 in flight, round robin over ``urls``) and wait for all; seconds taken."""
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in urls]
    targets = itertools.cycle(clients)
    semaphore = asyncio.Semaphore(32)
    ids: list[str] = []

    async def submit(n: int) -> None:
        async with semaphore:
            response = await next(targets).post("/api/v1/tasks", json={"payload": tiny_graph(n)})
            ids.append(response.json()["id"])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(submit(20_000_000 + n) for n in range(tasks)))
        deadline = time.monotonic() + 600
        while True:
            metrics = (await clients[0].get("/api/v1/queue/metrics")).json()
            if metrics["pending_tasks"] == 0 and metrics["running_tasks"] == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"tasks did not finish: {metrics}")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        sample = [
            (await clients[0].get(f"/api/v1/tasks/{task_id}")).json()
            for task_id in ids[:: max(1, tasks // 50)]
        ]
        unfinished = [task for task in sample if task["status"] != "completed"]
        if unfinished:
            raise SystemExit(f"{len(unfinished)} sampled tasks did not complete: {unfinished[0]}")
        return elapsed
    finally:
        for client in clients:
            await client.aclose()


async def run(replicas: int, worker_urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    async with fresh_postgres_database(args.postgres) as database:
        config = {
            "store": database,
            "pools": [{"name": "bench", "provider": "static", "settings": {"urls": worker_urls}}],
        }
        with contextlib.ExitStack() as stack:
            services = [
                stack.enter_context(service_process(config, expect_workers=WORKERS if index == 0 else 0))
                for index in range(replicas)
            ]
            server_pids = [service.popen.pid for service in services]
            database_pids = postgres_pids()
            await drive([s.url for s in services], min(200, args.tasks))  # warm-up
            before = [cpu_s([pid]) for pid in server_pids], cpu_s(database_pids)
            elapsed = await drive([s.url for s in services], args.tasks)
            after = [cpu_s([pid]) for pid in server_pids], cpu_s(database_pids)
    return {
        "rate": args.tasks / elapsed,
        "replica_cpu_ms": [(b - a) / args.tasks * 1000 for a, b in zip(before[0], after[0], strict=True)],
        "database_cpu_ms": (after[1] - before[1]) / args.tasks * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 tasks per run")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("COMFYFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    if args.quick:
        args.tasks = 500
    with emulator_processes(WORKERS) as emulators:
        urls = [emulator.url for emulator in emulators]
        results = {replicas: await run(replicas, urls, args) for replicas in (1, 2)}
    print(
        f"\n{args.tasks:,} zero-time tasks through {WORKERS} emulator workers, PostgreSQL store ({os.cpu_count()} CPUs)"
    )
    print(f"{'replicas':>9}{'tasks/s':>10}{'CPU/task per replica (ms)':>30}{'PostgreSQL CPU/task (ms)':>28}")
    for replicas, result in results.items():
        per_replica = " + ".join(f"{value:.2f}" for value in result["replica_cpu_ms"])
        print(f"{replicas:>9}{result['rate']:>10.1f}{per_replica:>30}{result['database_cpu_ms']:>28.2f}")
    ratio = results[2]["rate"] / results[1]["rate"]
    total = {r: sum(results[r]["replica_cpu_ms"]) + results[r]["database_cpu_ms"] for r in results}
    print(f"two replicas / one: {ratio:.2f}x")
    print(
        f"CPU per task, replicas + database: {total[1]:.2f} ms (one), {total[2]:.2f} ms (two); "
        f"{os.cpu_count()} cores allow at most {os.cpu_count() * 1000 / total[2]:.0f} tasks/s at the latter"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
