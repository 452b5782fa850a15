"""Autoscaling against an always-on pool, on the same bursty trace, in one run.

Both sides run the whole service in-process (SQLite store, HTTP API, dispatcher, worker manager) with a
``process`` pool of ComfyUI emulators that take ``--startup-delay`` seconds to answer (2 s by default, plus the
interpreter's own start) and ``--prompt-time`` seconds per prompt:

- ``autoscaled``: min 0, max N, ``idle_timeout``: starts from zero, scales with the queue, back to zero;
- ``always on``: min = max = N, warmed up before the trace starts (the cost of never waiting).

It prints, for each: time from the first submission to the first completion, task latency (p50/p95),
worker-seconds spent idle and worker-seconds alive (what a GPU bill counts) over the same window, and the ratios.

    .venv/bin/python bench/scale.py [--max-workers 4] [--startup-delay 2] [--prompt-time 1]
                                    [--trace "0:8,15:12,35:4"] [--horizon 60] [--idle-timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _harness import in_process_service, wait_all

from comfyfleet.domain import WorkerState
from comfyfleet.fleet.manager import FleetManager

SAMPLE_S = 0.05


@dataclass
class Result:
    name: str
    first_completion_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    idle_worker_s: float = 0.0
    alive_worker_s: float = 0.0
    busy_worker_s: float = 0.0
    peak_workers: int = 0
    workers_started: int = 0
    failed_tasks: int = 0


def parse_trace(text: str) -> list[tuple[float, int]]:
    bursts = []
    for part in text.split(","):
        at, _, count = part.partition(":")
        bursts.append((float(at), int(count)))
    return sorted(bursts)


def payload(index: int) -> dict[str, Any]:
    # A colour of its own per task, so the emulator's output cache never replays a result.
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": index},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def run_side(name: str, args: argparse.Namespace, always_on: bool, folder: Path) -> Result:
    command = [
        "{python}", "-m", "comfyfleet", "emulator", "--host", "{host}", "--port", "{port}", "--log-level", "warning",
        "--startup-delay", str(args.startup_delay), "--prompt-time", str(args.prompt_time),
    ]  # fmt: skip
    pool = {
        "name": "bench",
        "provider": "process",
        "min_workers": args.max_workers if always_on else 0,
        "max_workers": args.max_workers,
        "idle_timeout_s": 1e9 if always_on else args.idle_timeout,
        "prefetch": 1,
        "settings": {"command": command, "log_dir": str(folder / "logs"), "terminate_grace_s": 3},
    }
    result = Result(name)
    trace = parse_trace(args.trace)
    async with in_process_service(folder, pool, f"bench-{name.replace(' ', '-')}") as (fleet, http):
        if always_on:
            while len(fleet.usable_workers()) < args.max_workers:
                await fleet.wait_changed()
        task_ids: list[str] = []
        started = time.monotonic()
        sampler = asyncio.ensure_future(sample(fleet, result, started, args.horizon))
        index = 0
        for at, count in trace:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            answers = await asyncio.gather(
                *(http.post("/api/v1/tasks", json={"payload": payload(index + i)}) for i in range(count))
            )
            index += count
            task_ids += [answer.json()["id"] for answer in answers]
        tasks = await wait_all(http, task_ids, started + args.horizon + 120)
        await sampler
    created = [_time(task["created_at"]) for task in tasks]
    done = [task for task in tasks if task["status"] == "completed"]
    result.failed_tasks = len(tasks) - len(done)
    result.latencies_s = [(_time(t["completed_at"]) - _time(t["created_at"])).total_seconds() for t in done]
    if done:
        result.first_completion_s = (
            min(_time(t["completed_at"]) for t in done) - min(created)
        ).total_seconds()
    return result


async def sample(fleet: FleetManager, result: Result, started: float, horizon_s: float) -> None:
    """Integrate worker states over the window [trace start, trace start + horizon]."""
    seen: set[str] = set()
    last = time.monotonic()
    while last < started + horizon_s:
        await asyncio.sleep(SAMPLE_S)
        now = time.monotonic()
        step = now - last
        last = now
        live = [w for w in fleet.workers() if w.state is not WorkerState.TERMINATED]
        seen.update(w.id for w in live)
        result.peak_workers = max(result.peak_workers, len(live))
        result.alive_worker_s += step * len(live)
        result.idle_worker_s += step * sum(1 for w in live if w.state is WorkerState.IDLE)
        result.busy_worker_s += step * sum(1 for w in live if w.state is WorkerState.BUSY)
    result.workers_started = len(seen)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-workers", type=int, default=4)
    parser.add_argument("--startup-delay", type=float, default=2.0, help="emulator start-up delay (s)")
    parser.add_argument("--prompt-time", type=float, default=1.0, help="seconds per prompt")
    parser.add_argument("--trace", default="0:8,15:12,35:4", help="bursts as 'at_s:tasks,…'")
    parser.add_argument(
        "--horizon", type=float, default=60.0, help="measurement window from the first burst (s)"
    )
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    total = sum(count for _, count in parse_trace(args.trace))
    print(
        f"trace {args.trace} ({total} tasks), prompt {args.prompt_time} s, worker start-up delay {args.startup_delay} s, "
        f"max_workers {args.max_workers}, idle_timeout {args.idle_timeout} s, window {args.horizon} s"
    )
    results = []
    for name, always_on in (("autoscaled", False), ("always on", True)):
        with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-scale-") as folder:
            results.append(await run_side(name, args, always_on, Path(folder)))
            print(f"  ran {name}", file=sys.stderr)
    auto, fixed = results
    header = f"{'':34}{'autoscaled':>14}{'always on':>14}{'ratio':>10}"
    print(header)
    print("-" * len(header))

    def row(label: str, a: float, b: float, unit: str, ratio: bool = True) -> None:
        ratio_text = f"{a / b:9.2f}x" if ratio and b else ""
        print(f"{label:34}{a:12.2f}{unit:>2}{b:12.2f}{unit:>2}{ratio_text:>10}")

    row("first submission → completion", auto.first_completion_s, fixed.first_completion_s, " s")
    row("task latency p50", statistics.median(auto.latencies_s), statistics.median(fixed.latencies_s), " s")
    row("task latency p95", pct(auto.latencies_s, 0.95), pct(fixed.latencies_s, 0.95), " s")
    row("idle worker-seconds", auto.idle_worker_s, fixed.idle_worker_s, " s")
    row("alive worker-seconds (billed)", auto.alive_worker_s, fixed.alive_worker_s, " s")
    row("busy worker-seconds", auto.busy_worker_s, fixed.busy_worker_s, " s")
    print(
        f"{'peak workers / workers started':34}{auto.peak_workers:>8} / {auto.workers_started:<3}{fixed.peak_workers:>8} / {fixed.workers_started:<3}"
    )
    print(f"{'failed tasks':34}{auto.failed_tasks:>14}{fixed.failed_tasks:>14}")
    saved = 1 - auto.idle_worker_s / fixed.idle_worker_s if fixed.idle_worker_s else 0.0
    print(
        f"autoscaling spent {saved:.0%} fewer idle worker-seconds, for {auto.first_completion_s - fixed.first_completion_s:+.2f} s on the first result after a cold start"
    )


if __name__ == "__main__":
    asyncio.run(main())
