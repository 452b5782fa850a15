"""A pool with a warm-up workflow against the same pool without one, in one run.

Both sides run the whole service in-process (SQLite store, HTTP API, dispatcher, worker manager) with a
``process`` pool of ``--workers`` always-on ComfyUI emulators whose first use of a checkpoint costs
``--model-load`` seconds. Once every worker is ready (``idle``), ``--tasks`` small text-to-image tasks using
that checkpoint are submitted at once. Without a warm-up each worker's first task pays the model load; with
``warmup`` (a graph loading the checkpoint) the load happened before the worker was handed out.

It prints, for each side: time until every worker was ready, first submission → first completion, and task
latency (p50, max), with the ratios.

    .venv/bin/python bench/warmup.py [--workers 2] [--model-load 3] [--tasks 8] [--step-time 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import checkpoint_graph, in_process_service, parse_time, wait_all

CHECKPOINT = "sd_xl_base_1.0.safetensors"


WARMUP = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
    "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
    "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


async def run_side(name: str, args: argparse.Namespace, warmup: bool, folder: Path) -> dict[str, Any]:
    command = [
        "{python}", "-m", "comfyfleet", "emulator", "--host", "{host}", "--port", "{port}", "--log-level", "warning",
        "--model-load-time", str(args.model_load), "--step-time", str(args.step_time),
    ]  # fmt: skip
    pool = {
        "name": "bench",
        "provider": "process",
        "min_workers": args.workers,
        "max_workers": args.workers,
        "startup_timeout_s": 120,
        "prefetch": 1,
        "warmup": WARMUP if warmup else None,
        "settings": {"command": command, "log_dir": str(folder / "logs"), "terminate_grace_s": 3},
    }
    async with in_process_service(folder, pool, f"bench-{name.replace(' ', '-')}") as (fleet, http):
        booted = time.monotonic()
        while len(fleet.usable_workers()) < args.workers:
            await fleet.wait_changed()
        ready_s = time.monotonic() - booted
        answers = await asyncio.gather(
            *(
                http.post("/api/v1/tasks", json={"payload": checkpoint_graph(i, CHECKPOINT)})
                for i in range(args.tasks)
            )
        )
        tasks = await wait_all(http, [answer.json()["id"] for answer in answers], time.monotonic() + 300)
    if any(task["status"] != "completed" for task in tasks):
        raise SystemExit(f"{name}: not every task completed")
    latencies = [parse_time(t["completed_at"]) - parse_time(t["created_at"]) for t in tasks]
    first = min(parse_time(t["completed_at"]) for t in tasks) - min(
        parse_time(t["created_at"]) for t in tasks
    )
    return {"ready": ready_s, "first": first, "p50": statistics.median(latencies), "max": max(latencies)}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model-load", type=float, default=3.0, help="emulator checkpoint load time (s)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument(
        "--step-time", type=float, default=0.3, help="emulator seconds per KSampler step (1 step)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{args.workers} always-on process workers, checkpoint load {args.model_load} s, "
        f"{args.tasks} tasks of one {args.step_time} s step submitted once every worker is ready"
    )
    results = {}
    for name, warmup in (("no warm-up", False), ("warm-up", True)):
        with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-warmup-") as folder:
            results[name] = await run_side(name, args, warmup, Path(folder))
            print(f"  ran {name}", file=sys.stderr)
    cold, warm = results["no warm-up"], results["warm-up"]
    header = f"{'':34}{'no warm-up':>14}{'warm-up':>14}{'ratio':>10}"
    print(header)
    print("-" * len(header))
    for label, key in (
        ("start → every worker ready", "ready"),
        ("first submission → completion", "first"),
        ("task latency p50", "p50"),
        ("task latency max", "max"),
    ):
        ratio = f"{warm[key] / cold[key]:9.2f}x" if cold[key] else ""
        print(f"{label:34}{cold[key]:12.2f} s{warm[key]:12.2f} s{ratio:>10}")


if __name__ == "__main__":
    asyncio.run(main())
