"""Models on demand: what a pool's manifest costs at start-up, and what the host cache saves, in one run.

The whole service runs in-process (SQLite store, HTTP API, dispatcher, worker manager) with a ``process`` pool
of ComfyUI emulators that list only the files in their models folder (``--strict-models``). A loopback file
server serves sparse files with ``Range`` (``sendfile``) and counts the bytes it sends.

1. The bare download: the manifest's ``--size`` checkpoint fetched once with httpx, written and hashed (what
   any download must do), as the yardstick.
2. Cold start: the service starts with an empty cache; time until the first worker is ready (the checkpoint
   fetched, verified and linked, the emulator answering), as a ratio to the bare download.
3. A second worker (the queue asks for it): its time from creation to ready, and the file server's requests
   for the checkpoint (one: the host cache serves the second worker by a link).
4. The eight-LoRA trace: ``--rounds`` x 8 tasks, each bringing one of eight ``--lora-size`` LoRAs, over the
   two workers. Bytes fetched against a cache-less baseline (every task downloads its LoRA) and a per-worker
   cache (each worker downloads each LoRA it runs once).

    .venv/bin/python bench/models.py [--size 2GiB] [--lora-size 64MiB] [--rounds 3] [--prompt-time 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _files import FileServer, sparse_file
from _harness import checkpoint_graph, in_process_service, wait_all

from comfyfleet.fleet.manager import FleetManager

CHECKPOINT = "bench-base.safetensors"
_UNITS = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def size(text: str) -> int:
    upper = text.strip().upper()
    for unit, factor in _UNITS.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def bare_download(url: str, target: Path) -> tuple[float, float]:
    """Seconds to stream ``url`` into ``target`` while hashing it, as a download that verifies must; and with
    the ``fsync`` a cache that survives a crash needs on top."""
    started = time.monotonic()
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=60) as response, target.open("wb") as out:
        response.raise_for_status()
        for chunk in response.iter_raw(1 << 20):
            out.write(chunk)
            digest.update(chunk)
        downloaded = time.monotonic() - started
        os.fsync(out.fileno())
    return downloaded, time.monotonic() - started


def lora_graph(variant: int, lora: str) -> dict[str, Any]:
    graph = checkpoint_graph(variant, CHECKPOINT)
    graph["10"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0},
    }  # fmt: skip
    graph["3"]["inputs"]["model"] = ["10", 0]
    return graph


async def wait_usable(fleet: FleetManager, count: int, deadline: float) -> dict[str, float]:
    """Until ``count`` workers are usable; the wall-clock time each was first seen usable."""
    seen: dict[str, float] = {}
    while len(seen) < count:
        for worker in fleet.usable_workers():
            seen.setdefault(worker.id, time.time())
        if len(seen) >= count:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {count} workers became ready in time")
        try:
            async with asyncio.timeout(1.0):
                await fleet.wait_changed()
        except TimeoutError:
            pass
    return seen


async def run(args: argparse.Namespace, folder: Path, files: FileServer, big_sha: str) -> dict[str, Any]:
    command = [
        "{python}", "-m", "comfyfleet", "emulator", "--host", "{host}", "--port", "{port}", "--log-level", "warning",
        "--prompt-time", str(args.prompt_time), "--extra-model-paths-config", "{extra_model_paths}", "--strict-models",
    ]  # fmt: skip
    pool = {
        "name": "bench",
        "provider": "process",
        "min_workers": 1,
        "max_workers": 2,
        "startup_timeout_s": 900,
        "prefetch": 0,
        "models": [{"url": files.url(CHECKPOINT), "sha256": big_sha, "folder": "checkpoints"}],
        "models_allow_private": True,
        "settings": {"command": command, "log_dir": str(folder / "logs"), "terminate_grace_s": 3},
    }
    models = {"cache_dir": str(folder / "cache"), "workers_dir": str(folder / "workers")}
    started = time.time()
    async with in_process_service(folder, pool, "bench-models", models=models) as (fleet, http):
        first = await wait_usable(fleet, 1, time.monotonic() + 900)
        first_ready_s = min(first.values()) - started
        first_files_s = fleet.worker(next(iter(first))).info["models"]["seconds"]
        # Two tasks at once: the queue asks for a second worker, which finds the checkpoint on the host.
        busy = [
            (await http.post("/api/v1/tasks", json={"payload": checkpoint_graph(i, CHECKPOINT)})).json()["id"]
            for i in range(4)
        ]
        both = await wait_usable(fleet, 2, time.monotonic() + 900)
        second_id = next(worker_id for worker_id in both if worker_id not in first)
        second_ready_s = both[second_id] - fleet.worker(second_id).created_at.timestamp()
        await wait_all(http, busy, time.monotonic() + 300)
        checkpoint_requests = files.requests[CHECKPOINT]

        loras = [f"bench-lora-{index}.safetensors" for index in range(8)]
        specs = {
            name: {"url": files.url(name), "sha256": args.lora_sha[name], "folder": "loras"} for name in loras
        }
        submitted = []
        for round_ in range(args.rounds):
            for index, name in enumerate(loras):
                body = {"payload": lora_graph(1000 + round_ * 8 + index, name), "models": [specs[name]]}
                answer = await http.post("/api/v1/tasks", json=body)
                if answer.status_code >= 300:
                    raise SystemExit(f"submission refused: {answer.status_code} {answer.text}")
                submitted.append((name, answer.json()["id"]))
        tasks = await wait_all(http, [task_id for _, task_id in submitted], time.monotonic() + 900)
    failed = [task for task in tasks if task["status"] != "completed"]
    if failed:
        raise SystemExit(f"{len(failed)} tasks did not complete: {failed[0].get('error')}")
    per_worker = {(task["worker_id"], name) for (name, _), task in zip(submitted, tasks, strict=True)}
    return {
        "first_ready": first_ready_s,
        "first_files": first_files_s,
        "second_ready": second_ready_s,
        "checkpoint_requests": checkpoint_requests,
        "checkpoint_bytes": files.bytes_sent[CHECKPOINT],
        "lora_bytes": sum(files.bytes_sent[name] for name in loras),
        "lora_tasks": len(submitted),
        "per_worker_pairs": len(per_worker),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=size, default=size("2GiB"), help="the manifest's checkpoint")
    parser.add_argument("--lora-size", type=size, default=size("64MiB"))
    parser.add_argument("--rounds", type=int, default=3, help="times the eight LoRAs are asked for")
    parser.add_argument("--prompt-time", type=float, default=0.5, help="emulator seconds per prompt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-models-") as workdir:
        root = Path(workdir)
        served = root / "served"
        served.mkdir()
        print(f"preparing a {args.size / 1024**3:.2f} GiB sparse checkpoint and 8 LoRAs…", file=sys.stderr)
        big_sha = sparse_file(served / CHECKPOINT, args.size)
        args.lora_sha = {
            f"bench-lora-{index}.safetensors": sparse_file(
                served / f"bench-lora-{index}.safetensors", args.lora_size, f"lora {index}".encode()
            )
            for index in range(8)
        }
        with FileServer(served).running() as files:
            bare_s, synced_s = await asyncio.to_thread(
                bare_download, files.url(CHECKPOINT), root / "bare.bin"
            )
            (root / "bare.bin").unlink()
            files.requests.clear()
            files.bytes_sent.clear()
            service_dir = root / "service"
            service_dir.mkdir()
            result = await run(args, service_dir, files, big_sha)

    gib = args.size / 1024**3
    lora_mib = args.lora_size / 1024**2
    print(
        f"pool manifest: one {gib:.2f} GiB checkpoint from a loopback file server; process workers (emulator)"
    )
    print(f"  bare download (stream, write, sha256)      {bare_s:8.2f} s   ({gib / bare_s:.2f} GiB/s)")
    print(f"    the same with fsync (a durable cache)    {synced_s:8.2f} s")
    print(
        f"  cold start → first worker ready            {result['first_ready']:8.2f} s   "
        f"{result['first_ready'] / bare_s:.2f}x the bare download, {result['first_ready'] / synced_s:.2f}x with fsync"
    )
    print(f"    of which its model files (fetch, verify, link) {result['first_files']:6.2f} s")
    print(
        f"  second worker: created → ready             {result['second_ready']:8.2f} s   "
        f"{result['second_ready'] / result['first_ready']:.3f}x the first"
    )
    print(
        f"  checkpoint fetched                         {result['checkpoint_requests']} request(s), "
        f"{result['checkpoint_bytes'] / 1024**3:.2f} GiB for 2 workers (cache-less: {2 * gib:.2f} GiB)"
    )
    fetched = result["lora_bytes"] / 1024**2
    baseline = result["lora_tasks"] * lora_mib
    per_worker = result["per_worker_pairs"] * lora_mib
    print(f"{result['lora_tasks']} tasks bringing 8 LoRAs of {lora_mib:.0f} MiB over 2 workers:")
    print(f"  fetched with the host cache                {fetched:8.0f} MiB")
    print(
        f"  cache-less (each task downloads)           {baseline:8.0f} MiB   ratio {fetched / baseline:.3f}"
    )
    print(
        f"  a cache per worker (no sharing)            {per_worker:8.0f} MiB   ratio {fetched / per_worker:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
