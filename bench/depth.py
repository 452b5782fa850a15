"""What a deep queue costs the reads and writes that must not grow with it (issue 11), on SQLite and
PostgreSQL, side by side in one run.

For each store: ``comfyfleet serve`` in a subprocess (no workers), the medians with an empty queue, then
``--depth`` pending tasks inserted in one SQL statement (mixed priorities 0-9, as a backlog builds up; the
store's triggers count them as they would any submission), then the same medians again:

* ``GET /api/v1/tasks/{id}`` of the newest task at the lowest priority (the back of the queue), with its
  ``queue_position`` (which must be exact);
* ``GET /api/v1/queue/metrics``;
* a claim as the dispatcher claims (``peek_pending`` then ``claim_ids``, one task) through the store;
* ``POST /api/v1/tasks``;
* and the server's resident memory.

    .venv/bin/python bench/depth.py [--quick] [--depth 1000000] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from submit import SEED_BODY, median_s, running_server, store_for

from comfyfleet.store import open_store

TARGET_MS, TARGET_RSS_MIB = 2.0, 200
PAYLOAD = (
    '{"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 1}}}'
)


def fill_sql(depth: int, now: str, *, postgres: bool) -> str:
    """One statement inserting ``depth`` pending tasks, priorities 0-9 in turn."""
    columns = "id, tenant, priority, status, payload, created_at, updated_at, max_retries, timeout_s"
    values = (
        f"'fill-' || n, 'default', n % 10, 'pending', '{PAYLOAD}', '{now}', '{now}', 3, 600"
        if not postgres
        else f"'fill-' || n, 'default', n % 10, 'pending', '{PAYLOAD}'::jsonb, now(), now(), 3, 600"
    )
    if postgres:
        return f"INSERT INTO tasks ({columns}) SELECT {values} FROM generate_series(1, {depth}) AS n"
    return (
        f"WITH RECURSIVE numbers(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM numbers WHERE n < {depth}) "
        f"INSERT INTO tasks ({columns}) SELECT {values} FROM numbers"
    )


async def fill(kind: str, url: str, depth: int) -> float:
    started = time.perf_counter()
    if kind == "sqlite":
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=60)
        with connection:
            connection.execute(fill_sql(depth, now, postgres=False))
        connection.close()
    else:
        import asyncpg

        connection = await asyncpg.connect(url)
        try:
            await connection.execute(fill_sql(depth, "", postgres=True))
            await connection.execute("VACUUM ANALYZE tasks")
        finally:
            await connection.close()
    return time.perf_counter() - started


async def figures(server: Any, url: str, repeats: int) -> dict[str, float]:
    """The medians at the queue's current depth."""
    # aiohttp: a client that costs a fifth of httpx's CPU per request, so the medians are the server's.
    async with open_store(url) as store, aiohttp.ClientSession(server.url) as client:
        owner = f"bench-{uuid.uuid4().hex[:6]}"

        async def claim_one() -> None:
            head = await store.peek_pending(limit=1)
            assert len(await store.claim_ids(owner, 30.0, [task.id for task in head])) == 1

        async def call(method: str, path: str, expected: int, body: Any = None) -> Any:
            async with client.request(method, path, json=body) as response:
                assert response.status == expected, await response.text()
                return await response.json()

        async def submit() -> None:
            await call("POST", "/api/v1/tasks", 201, {**SEED_BODY, "priority": 0})

        back = (await call("POST", "/api/v1/tasks", 201, {**SEED_BODY, "priority": -1}))["id"]

        async def read_task() -> None:
            await call("GET", f"/api/v1/tasks/{back}", 200)

        async def read_metrics() -> None:
            await call("GET", "/api/v1/queue/metrics", 200)

        result = {
            "get_task": await median_s(read_task, repeats),
            "metrics": await median_s(read_metrics, repeats),
            "submit": await median_s(submit, repeats),
        }
        # Claims take the head; the submissions above keep the queue as deep as it was.
        result["claim"] = await median_s(claim_one, repeats)
        result["position"] = float((await call("GET", f"/api/v1/tasks/{back}", 200))["queue_position"])
        result["pending"] = float((await call("GET", "/api/v1/queue/metrics", 200))["pending_tasks"])
        result["rss"] = server.rss_mib()
        return result


async def measure(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    async with store_for(kind, workdir, args.postgres, f"{kind}-depth") as url:
        with running_server(url, workdir, f"{kind}-depth") as server:
            shallow = await figures(server, url, args.repeats)
            filled = await fill(kind, url, args.depth)
            print(f"{kind}: {args.depth:,} tasks inserted in {filled:.1f} s", flush=True)
            deep = await figures(server, url, args.repeats)
    return {"0": shallow, "deep": deep}


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"\nMedians of {args.repeats} calls at 0 and {args.depth:,} pending tasks (ms; server on this machine)"
    )
    columns = [(kind, depth) for kind in results for depth in ("0", "deep")]
    label = {"0": "0", "deep": f"{args.depth:,}"}
    print(f"{'':24}" + "".join(f"{kind + ' @' + label[depth]:>22}" for kind, depth in columns))
    for key, name in [
        ("get_task", "GET /tasks/{id}"),
        ("metrics", "GET /queue/metrics"),
        ("claim", "claim one"),
        ("submit", "POST /tasks"),
    ]:
        print(f"{name:24}" + "".join(f"{results[k][d][key] * 1000:22.2f}" for k, d in columns))
    print(
        f"{'queue_position (back)':24}" + "".join(f"{results[k][d]['position']:22,.0f}" for k, d in columns)
    )
    print(f"{'pending (metrics)':24}" + "".join(f"{results[k][d]['pending']:22,.0f}" for k, d in columns))
    print(f"{'server RSS MiB':24}" + "".join(f"{results[k][d]['rss']:22.0f}" for k, d in columns))
    for kind in results:
        deep, shallow = results[kind]["deep"], results[kind]["0"]
        worst = max(deep[key] for key in ("get_task", "metrics", "claim", "submit")) * 1000
        ratios = ", ".join(
            f"{key} {deep[key] / shallow[key]:.2f}x" for key in ("get_task", "metrics", "claim", "submit")
        )
        verdict = "meets" if worst <= TARGET_MS and deep["rss"] <= TARGET_RSS_MIB else "MISSES"
        print(
            f"{kind}: deep / empty {ratios}; worst p50 {worst:.2f} ms, RSS {deep['rss']:.0f} MiB: {verdict} "
            f"the targets ({TARGET_MS:g} ms, {TARGET_RSS_MIB} MiB)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100,000 tasks and fewer samples")
    parser.add_argument("--depth", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("COMFYFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.repeats = 100_000, 30
    kinds = ["sqlite"] if args.skip_postgres else ["sqlite", "postgresql"]
    workdir = Path(tempfile.mkdtemp(prefix="comfyfleet-bench-"))
    try:
        report({kind: await measure(kind, workdir, args) for kind in kinds}, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
