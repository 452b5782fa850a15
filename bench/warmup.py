"""A pool with a warm-up workflow against the same pool without one, in one run.

Both sides run the whole service in-process (SQLite store, HTTP API, dispatcher, worker manager) with a
``process`` pool of ``--workers`` always-on ComfyUI emulators whose first use of a checkpoint costs
``--model-load`` seconds. Once every worker is ready (``idle``), ``--tasks`` text-to-image tasks using that
checkpoint are submitted at once. Without a warm-up each worker's first task pays the model load; with
``warmup`` (a graph loading the checkpoint) the load happened before the worker was handed out.

It prints, for each side: time until every worker was ready, first submission → first completion, and task
latency (p50, max), with the ratios.

    .venv/bin/python bench/warmup.py [--workers 2] [--model-load 3] [--tasks 8] [--step-time 0.02]
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

import httpx
from scale import _time, wait_all

from comfyfleet.config import load_settings
from comfyfleet.fleet.manager import FleetManager
from comfyfleet.runtime import Runtime

CHECKPOINT = "sd_xl_base_1.0.safetensors"


def task_payload(index: int) -> dict[str, Any]:
    # A seed of its own per task, so the emulator's output cache never replays a result.
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a lighthouse at dusk"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": index,
            "steps": 10, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }  # fmt: skip


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
    settings = load_settings(
        store=f"sqlite:///{folder / 'bench.db'}",
        outputs=str(folder / "outputs"),
        host="127.0.0.1",
        port=0,
        pools=[pool],
        fleet={"namespace": f"bench-{name.replace(' ', '-')}", "probe_interval_s": 1.0, "reconcile_interval_s": 0.5},
    )
    async with Runtime(settings) as runtime:
        serving = asyncio.ensure_future(runtime.run())
        try:
            port = await runtime.wait_listening()
            fleet: FleetManager = runtime.app.state.fleet
            booted = time.monotonic()
            while len(fleet.usable_workers()) < args.workers:
                await fleet.wait_changed()
            ready_s = time.monotonic() - booted
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                answers = await asyncio.gather(
                    *(http.post("/api/v1/tasks", json={"payload": task_payload(i)}) for i in range(args.tasks))
                )
                tasks = await wait_all(http, [answer.json()["id"] for answer in answers], time.monotonic() + 300)
        finally:
            runtime.request_stop()
            await serving
    if any(task["status"] != "completed" for task in tasks):
        raise SystemExit(f"{name}: not every task completed")
    latencies = [(_time(t["completed_at"]) - _time(t["created_at"])).total_seconds() for t in tasks]
    first = min(_time(t["completed_at"]) for t in tasks) - min(_time(t["created_at"]) for t in tasks)
    return {"ready": ready_s, "first": first.total_seconds(), "p50": statistics.median(latencies), "max": max(latencies)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model-load", type=float, default=3.0, help="emulator checkpoint load time (s)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--step-time", type=float, default=0.02, help="emulator seconds per KSampler step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"{args.workers} always-on process workers, checkpoint load {args.model_load} s, "
        f"{args.tasks} tasks of 10 steps x {args.step_time} s submitted once every worker is ready"
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
