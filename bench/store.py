"""The store on its own, SQLite and PostgreSQL side by side: what a submission costs, and what a claim costs
with an empty queue and with a deep one.

Prints, per backend:

1. ``create_task`` one at a time (latency) and many concurrently (throughput; on SQLite also where the
   writes were committed: on the event loop's connection, or on the writer thread in group commits);
2. with ``--depth`` tasks pending (from 10 tenants): the median time of a claim of one task the way the
   dispatcher claims (``peek_pending`` then ``claim_ids``), ``queue_position`` of the last task, ``peek_pending``, the fair-share reads (``peek_pending_per_tenant``, ``running_per_tenant``)
   and ``queue_metrics``, next to the same at depth ~0, and the ratio.

Usage: ``.venv/bin/python bench/store.py [--depth 100000] [--repeats 200]``
(``--postgres URL`` names the server's admin database, default ``postgresql://postgres@127.0.0.1:5432/test``;
a scratch database is created and dropped; ``--skip-postgres`` to omit it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from comfyfleet.domain import NewTask
from comfyfleet.store import Store, open_store
from comfyfleet.store.sqlite import SQLiteStore

PAYLOAD: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"clip": ["4", 1], "text": "a bottle of wine on a table"},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "text, watermark"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


TENANTS = 10  # the queue is filled by this many tenants, for the fair-share reads


def new(priority: int = 0, tenant: str = "default") -> NewTask:
    return NewTask(payload=PAYLOAD, priority=priority, workflow_id="bench", tenant=tenant)


async def median_ms(action: Callable[[], Awaitable[Any]], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def fill(store: Store, count: int, concurrency: int = 2000) -> float:
    """Insert ``count`` pending tasks; return the submissions per second."""
    started = time.perf_counter()
    for offset in range(0, count, concurrency):
        batch = min(concurrency, count - offset)
        await asyncio.gather(
            *(
                store.create_task(new((offset + n) % 10, f"tenant-{(offset + n) % TENANTS}"))
                for n in range(batch)
            )
        )
    return count / (time.perf_counter() - started)


async def claim_next(store: Store, owner: str, limit: int = 1) -> list[Any]:
    """Claim the head of the queue as the dispatcher does: peek, then claim exactly those tasks."""
    head = await store.peek_pending(limit=limit)
    return await store.claim_ids(owner, 60, [task.id for task in head])


async def measure(label: str, store: Store, depth: int, repeats: int) -> list[str]:
    lines = []
    sequential = await median_ms(lambda: store.create_task(new()), repeats)
    lines.append(f"{label:10} create_task one at a time: median {sequential:.3f} ms")
    sqlite = isinstance(store, SQLiteStore)
    before = (*store.inline_stats, *store.write_stats) if sqlite else None
    rate = await fill(store, 20_000)
    grouped = ""
    if before is not None:
        (inline, inline_commits), (writes, commits) = store.inline_stats, store.write_stats
        grouped = (
            f", {inline - before[0]:,} on the loop's connection in {inline_commits - before[1]:,} commits,"
            f" {writes - before[2]:,} on the writer thread in {commits - before[3]:,}"
        )
    lines.append(
        f"{label:10} create_task 2,000 in flight: {rate:,.0f}/s = {1000 / rate:.3f} ms each{grouped}"
    )
    while await claim_next(store, "drain", limit=1000):
        pass

    async def figures() -> dict[str, float]:
        last, _ = await store.create_task(new(-1))
        result = {
            "peek+claim_ids": await median_ms(lambda: claim_next(store, "bench"), repeats),
            "queue_position": await median_ms(lambda: store.queue_position(last.id), max(10, repeats // 10)),
            "peek_pending(10)": await median_ms(lambda: store.peek_pending(limit=10), repeats),
            "peek_per_tenant(10)": await median_ms(lambda: store.peek_pending_per_tenant(limit=10), repeats),
            "running_per_tenant": await median_ms(store.running_per_tenant, repeats),
            "queue_metrics": await median_ms(store.queue_metrics, max(10, repeats // 10)),
        }
        return result

    await fill(store, repeats + 10)
    shallow = await figures()
    await fill(store, depth)
    deep = await figures()
    for name in shallow:
        lines.append(
            f"{label:10} {name:19} depth ~0: {shallow[name]:8.3f} ms   depth {depth:,}: {deep[name]:8.3f} ms   "
            f"ratio {deep[name] / shallow[name]:5.1f}x"
        )
    return lines


@asynccontextmanager
async def sqlite_store() -> AsyncIterator[Store]:
    with tempfile.TemporaryDirectory() as folder:
        async with open_store(f"sqlite:///{Path(folder) / 'bench.db'}") as store:
            await store.migrate()
            yield store


@asynccontextmanager
async def postgres_store(admin_url: str) -> AsyncIterator[Store]:
    import asyncpg

    name = f"cf_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with open_store(
            urlsplit(admin_url)._replace(path=f"/{name}").geturl(), max_connections=10
        ) as store:
            await store.migrate()
            yield store
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    report: list[str] = []
    async with sqlite_store() as store:
        report += await measure("sqlite", store, args.depth, args.repeats)
    if not args.skip_postgres:
        async with postgres_store(args.postgres) as store:
            report += await measure("postgres", store, args.depth, args.repeats)
    print("\n".join(report))


if __name__ == "__main__":
    asyncio.run(main())
