"""Dispatch benchmark (issue 4): latency, keeping GPUs busy, model-aware placement.

Every side is measured in this one run, on this machine, against emulator workers that each run in their
own process, through ``comfyfleet serve`` in its own process, over HTTP on loopback:

1. Latency, workers with zero execution time, one task at a time: submit → prompt accepted by the worker,
   and worker done → task completed (targets: p50 10 ms and 20 ms).
2. Keeping GPUs busy: 4 workers, 400 tasks of 500 ms, all submitted at once; wall time over the ideal
   (tasks x time / workers), with prefetch off and on (target with prefetch: at most 1.03).
3. Placement: 4 workers, 4 checkpoints used at random, model load 2 s, one model resident (LRU 1); mean
   task latency with model-aware placement against plain FIFO on the same trace (target: at least 2x).

    python bench/dispatch.py                 # everything, as the issue sets it (about 4 minutes)
    python bench/dispatch.py --quick         # smaller runs, for a smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (
    checkpoint_graph,
    emulator_processes,
    parse_time,
    service_process,
    summary_ms,
    tiny_graph,
)

CHECKPOINTS = [f"model_{name}.safetensors" for name in "abcd"]


def pool_config(urls: list[str], *, prefetch: int = 1, placement: bool = True) -> dict[str, Any]:
    return {
        "pools": [{"name": "bench", "provider": "static", "prefetch": prefetch, "settings": {"urls": urls}}],
        "dispatch": {"placement": placement},
        "fleet": {"probe_interval_s": 1.0},
    }


async def wait_all(client: httpx.AsyncClient, ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Wait for every task to end (sync-wait requests, a few at a time), then read them all."""
    deadline = time.monotonic() + timeout_s
    remaining = set(ids)
    while remaining:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(remaining)} tasks did not finish in {timeout_s} s")
        page = await client.get("/api/v1/queue/metrics")
        metrics = page.json()
        if metrics["pending_tasks"] == 0 and metrics["running_tasks"] == 0:
            break
        await asyncio.sleep(0.1)
    tasks = []
    for task_id in ids:
        tasks.append((await client.get(f"/api/v1/tasks/{task_id}")).json())
    unfinished = [task["id"] for task in tasks if task["status"] != "completed"]
    if unfinished:
        raise RuntimeError(
            f"{len(unfinished)} tasks did not complete, e.g. {tasks[ids.index(unfinished[0])]}"
        )
    return tasks


async def latency(count: int) -> None:
    print(f"\n1. Latency: 2 workers with zero execution time, {count} tasks one at a time")
    with (
        emulator_processes(2) as workers,
        service_process(pool_config([w.url for w in workers]), expect_workers=2) as svc,
    ):
        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as client:
            accept, collect, total = [], [], []
            for n in range(count + 20):
                started = time.time()
                response = await client.post(
                    "/api/v1/tasks", params={"wait": 30}, json={"payload": tiny_graph(n)}
                )
                task = response.json()
                if task["status"] != "completed":
                    raise RuntimeError(f"task did not complete: {task}")
                if n < 20:
                    continue  # warm-up: connections, caches
                timings = task["result"]["timings"]
                accept.append(parse_time(timings["prompt_accepted_at"]) - started)
                collect.append(parse_time(task["completed_at"]) - parse_time(timings["worker_finished_at"]))
                total.append(parse_time(task["completed_at"]) - started)
    print(f"   submit → prompt accepted by worker : {summary_ms(accept)}   target p50 10 ms")
    print(f"   worker done → task completed       : {summary_ms(collect)}   target p50 20 ms")
    print(f"   submit → task completed            : {summary_ms(total)}")
    print("   (worker done is the worker's execution_success timestamp, which ComfyUI gives in whole ms)")


async def busy_run(tasks: int, task_time: float, prefetch: int) -> float:
    with (
        emulator_processes(4, "--prompt-time", str(task_time)) as workers,
        service_process(pool_config([w.url for w in workers], prefetch=prefetch), expect_workers=4) as svc,
    ):
        async with httpx.AsyncClient(
            base_url=svc.url, timeout=60, limits=httpx.Limits(max_connections=20)
        ) as client:
            started = time.time()
            semaphore = asyncio.Semaphore(20)

            async def submit(n: int) -> str:
                async with semaphore:
                    response = await client.post("/api/v1/tasks", json={"payload": tiny_graph(n)})
                    return str(response.json()["id"])

            ids = await asyncio.gather(*(submit(n) for n in range(tasks)))
            done = await wait_all(client, list(ids), timeout_s=tasks * task_time * 2 + 60)
            return max(parse_time(task["completed_at"]) for task in done) - started


async def keep_busy(tasks: int, task_time: float) -> None:
    ideal = tasks * task_time / 4
    print(
        f"\n2. Keeping GPUs busy: 4 workers, {tasks} tasks of {task_time * 1000:.0f} ms, ideal wall time {ideal:.1f} s"
    )
    results = {}
    for prefetch in (0, 1):
        wall = await busy_run(tasks, task_time, prefetch)
        results[prefetch] = wall
        print(f"   prefetch {prefetch}: wall {wall:7.2f} s   wall / ideal = {wall / ideal:.4f}")
    print(f"   prefetch off / on = {results[0] / results[1]:.3f}x   target with prefetch: at most 1.03")


async def placement_run(trace: list[tuple[float, str]], task_time: float, placement: bool) -> list[float]:
    args = ["--prompt-time", str(task_time), "--model-load-time", "2", "--model-cache-size", "1"]
    with (
        emulator_processes(4, *args) as workers,
        service_process(pool_config([w.url for w in workers], placement=placement), expect_workers=4) as svc,
    ):
        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as client:
            # Load each worker with one checkpoint first so both runs start from the same state.
            ids: list[str] = []
            origin = time.monotonic()
            for n, (at, checkpoint) in enumerate(trace):
                delay = at - (time.monotonic() - origin)
                if delay > 0:
                    await asyncio.sleep(delay)
                response = await client.post(
                    "/api/v1/tasks", json={"payload": checkpoint_graph(n, checkpoint)}
                )
                ids.append(response.json()["id"])
            done = await wait_all(client, ids, timeout_s=600)
            return [parse_time(task["completed_at"]) - parse_time(task["created_at"]) for task in done]


async def placement(tasks: int, task_time: float) -> None:
    rng = random.Random(42)
    # Arrivals at about 80 % of what four workers can do when no model has to be loaded.
    rate = 0.8 * 4 / task_time
    at, trace = 0.0, []
    for _ in range(tasks):
        at += rng.expovariate(rate)
        trace.append((at, rng.choice(CHECKPOINTS)))
    print(
        f"\n3. Placement: 4 workers, 4 checkpoints, load 2 s, LRU 1, {tasks} tasks of {task_time * 1000:.0f} ms "
        f"arriving at {rate:.1f}/s (same trace for both runs)"
    )
    means = {}
    for enabled in (False, True):
        latencies = await placement_run(trace, task_time, enabled)
        means[enabled] = statistics.fmean(latencies)
        label = "model-aware" if enabled else "FIFO       "
        print(f"   {label}: mean task latency {means[enabled]:7.2f} s   {summary_ms(latencies)}")
    print(f"   FIFO / model-aware = {means[False] / means[True]:.2f}x   target: at least 2x")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--only", choices=["latency", "busy", "placement"], help="run one part")
    args = parser.parse_args()
    quick = args.quick
    if args.only in (None, "latency"):
        await latency(100 if quick else 300)
    if args.only in (None, "busy"):
        await keep_busy(80 if quick else 400, 0.5)
    if args.only in (None, "placement"):
        await placement(60 if quick else 120, 0.25)


if __name__ == "__main__":
    asyncio.run(main())
