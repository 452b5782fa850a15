"""What comfyfleet costs per task next to ComfyUI itself (issue 11), measured side by side in one run.

A trivial model-free workflow (EmptyImage 64x64 -> ImageInvert -> SaveImage, a new colour each time so the
node cache never answers) runs three ways against the same ComfyUI servers, interleaved:

* direct: ComfyUI's own protocol straight to the server (POST /prompt, wait on /ws for ``executing{node:
  null}``, GET /history/{id}, GET /view of the PNG);
* REST: ``POST /api/v1/tasks?wait=30`` on comfyfleet, then GET of the output's url;
* gateway: the same protocol as direct, against comfyfleet's ComfyUI-compatible gateway.

Every run ends with the PNG in hand. Printed: latency p50/p99 one task at a time (1 worker), saturated
throughput with 1 and with 4 workers (direct over 4 workers is the sum of each server driven on its own),
comfyfleet's CPU seconds per task (``psutil`` on the ``serve`` process) and the workers' CPU per task, the
dispatch timings from the server's own timestamps, and every figure's ratio to direct.

    .venv/bin/python bench/overhead.py [--quick] [--prompt-time S] [--comfyui URL ...]
                                       [--baseline OTHER/.venv/bin/python]

Without ``--comfyui`` it starts emulators (one process each); with it, the 1-worker figures use the first
URL and the 4-worker figures need four (or are skipped). The emulators answer at once by default, which
leaves only overhead (the machine's CPU is then the ceiling of every side); ``--prompt-time S`` makes each
prompt take S seconds of the worker's time without using this machine's CPU, as a GPU would: 0.011 gives
direct the 15.4 ms p50 that the real ComfyUI 0.33 of issue 11 took for this workflow on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).parent))
from _harness import PYTHON, emulator_processes, parse_time, percentile, service_process

TARGETS = {
    "p50": 1.3,
    "throughput_1": 0.95,
    "throughput_4": 0.9,
    "cpu_ms": 5.0,
    "accept_ms": 2.0,
    "collect_ms": 3.0,
}


def trivial_graph(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "overhead"}},
    }


class ComfyProtocol:
    """One ComfyUI client: an HTTP client and one socket, one prompt at a time (ComfyUI's own example)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.http = httpx.AsyncClient(base_url=url, timeout=60)
        self.ws: ClientConnection | None = None

    async def open(self) -> None:
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await connect(ws_url, compression=None, max_size=None)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.aclose()

    async def run(self, color: int) -> dict[str, Any]:
        assert self.ws is not None
        prompt_id = str(uuid.uuid4())
        body = {"prompt": trivial_graph(color), "prompt_id": prompt_id, "client_id": self.client_id}
        (await self.http.post("/prompt", json=body)).raise_for_status()
        while True:
            frame = await self.ws.recv()
            if isinstance(frame, bytes):
                continue
            message = json.loads(frame)
            data = message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if message["type"] == "executing" and data.get("node") is None:
                break
            if message["type"] in ("execution_error", "execution_interrupted"):
                raise SystemExit(f"prompt {prompt_id} failed: {message}")
        entry = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        image = entry["outputs"]["3"]["images"][0]
        png = await self.http.get("/view", params=image)
        if png.status_code != 200 or not png.content.startswith(b"\x89PNG"):
            raise SystemExit(f"no PNG for {prompt_id}: {png.status_code}")
        return {}


class Rest:
    """comfyfleet's REST API: submit and wait in one request, then download the output."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=60)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self.http.aclose()

    async def run(self, color: int) -> dict[str, Any]:
        response = await self.http.post(
            "/api/v1/tasks", params={"wait": 30}, json={"payload": trivial_graph(color)}
        )
        task = response.json()
        if task.get("status") != "completed" or not task["result"]["outputs"]:
            raise SystemExit(f"task did not complete with an output: {task}")
        png = await self.http.get(task["result"]["outputs"][0]["url"])
        if png.status_code != 200 or not png.content.startswith(b"\x89PNG"):
            raise SystemExit(f"no PNG for task {task['id']}: {png.status_code}")
        return dict(task)


Client = ComfyProtocol | Rest


@dataclass
class Side:
    """One way of running the workflow, and what it measured."""

    name: str
    make: Callable[[int], Client]  # runner number -> a client
    server_pid: int | None = None  # the comfyfleet serving it (None: direct)
    latencies: list[float] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    done: dict[int, int] = field(default_factory=dict)  # workers -> tasks completed in the saturated runs
    seconds: dict[int, float] = field(default_factory=dict)
    server_cpu: dict[int, float] = field(default_factory=dict)
    worker_cpu: dict[int, float] = field(default_factory=dict)


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def opened(clients: list[Client]) -> list[Client]:
    await asyncio.gather(*(client.open() for client in clients))
    return clients


async def latency_round(sides: list[Side], runs: int, warmup: int, rng: random.Random) -> None:
    clients = await opened([side.make(0) for side in sides])
    try:
        for iteration in range(warmup + runs):
            order = list(range(len(sides)))
            rng.shuffle(order)
            for index in order:
                started = time.perf_counter()
                task = await clients[index].run(rng.randrange(0xFFFFFF))
                if iteration >= warmup:
                    sides[index].latencies.append(time.perf_counter() - started)
                    if task:
                        sides[index].tasks.append(task)
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def saturate(
    side: Side, workers: int, concurrency: int, seconds: float, worker_pids: list[int]
) -> None:
    clients = await opened([side.make(n) for n in range(concurrency)])
    rng = random.Random(workers)
    count = 0
    stop_at = time.perf_counter() + seconds
    server_pids = [side.server_pid] if side.server_pid else []

    async def loop(client: Client) -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            await client.run(rng.randrange(0xFFFFFF))
            count += 1

    try:
        server_before, workers_before = cpu_s(server_pids), cpu_s(worker_pids)
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for client in clients))
        elapsed = time.perf_counter() - started
        server_after, workers_after = cpu_s(server_pids), cpu_s(worker_pids)
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    side.done[workers] = side.done.get(workers, 0) + count
    side.seconds[workers] = side.seconds.get(workers, 0.0) + elapsed
    side.server_cpu[workers] = side.server_cpu.get(workers, 0.0) + server_after - server_before
    side.worker_cpu[workers] = side.worker_cpu.get(workers, 0.0) + workers_after - workers_before


def pool_config(urls: list[str]) -> dict[str, Any]:
    return {"pools": [{"name": "bench", "provider": "static", "settings": {"urls": urls}}]}


async def measure(urls: list[str], worker_pids: list[int], args: argparse.Namespace) -> list[Side]:
    """Every figure for one set of workers (1 or 4) through one ``serve`` (and the baseline's, if given)."""
    workers = len(urls)
    versions = [("", PYTHON)] + ([(" (base)", args.baseline)] if args.baseline else [])
    with contextlib.ExitStack() as stack:
        sides = [Side("direct", lambda n: ComfyProtocol(urls[n % workers]))]
        for suffix, python in versions:
            service = stack.enter_context(
                service_process(pool_config(urls), expect_workers=workers, python=python)
            )
            url, pid = service.url, service.popen.pid
            sides.append(Side("REST" + suffix, lambda n, url=url: Rest(url), pid))
            sides.append(Side("gateway" + suffix, lambda n, url=url: ComfyProtocol(url), pid))
        rng = random.Random(11)
        if workers == 1:
            await latency_round(sides, args.runs, args.warmup, rng)
        for _ in range(args.rounds):
            order = sides[:]
            rng.shuffle(order)
            for side in order:
                await saturate(side, workers, args.concurrency * workers, args.seconds, worker_pids)
    return sides


def ms(value: float) -> str:
    return f"{value * 1000:8.2f}"


def report(one: list[Side], four: list[Side] | None, args: argparse.Namespace) -> None:
    direct = one[0]
    base_p50 = percentile(direct.latencies, 50)
    print(f"\nOne task at a time through 1 worker ({args.runs} runs each, interleaved, PNG in hand):")
    print(f"{'':10}{'p50 ms':>9}{'p99 ms':>9}{'p50 ratio':>11}")
    for side in one:
        p50 = percentile(side.latencies, 50)
        print(f"{side.name:10}{ms(p50)} {ms(percentile(side.latencies, 99))}{p50 / base_p50:10.2f}x")
    print(
        f"\nSaturated throughput ({args.concurrency} clients per worker, {args.rounds} x {args.seconds:g} s per side, "
        "interleaved); CPU per task from the processes' own counters:"
    )
    print(
        f"{'':10}{'workers':>8}{'tasks/s':>9}{'ratio':>8}{'comfyfleet CPU/task ms':>24}{'worker CPU/task ms':>20}"
    )
    for sides in (one, four):
        if sides is None:
            continue
        workers = 1 if sides is one else 4
        base = sides[0].done[workers] / sides[0].seconds[workers]
        for side in sides:
            rate = side.done[workers] / side.seconds[workers]
            server = (
                "-"
                if side.name == "direct"
                else f"{side.server_cpu[workers] / side.done[workers] * 1000:.2f}"
            )
            worker = side.worker_cpu[workers] / side.done[workers] * 1000
            print(f"{side.name:10}{workers:8}{rate:9.1f}{rate / base:7.2f}x{server:>24}{worker:20.2f}")
    print("\nDispatch (the REST runs above, server timestamps; the worker's finish time is in whole ms):")
    for rest in (side for side in one if side.name.startswith("REST")):
        timings = [(task, task["result"]["timings"]) for task in rest.tasks]
        accept = [parse_time(t["prompt_accepted_at"]) - parse_time(task["created_at"]) for task, t in timings]
        collect = [
            parse_time(task["completed_at"]) - parse_time(t["worker_finished_at"]) for task, t in timings
        ]
        print(
            f"  {rest.name:14} stored -> prompt accepted p50 {ms(percentile(accept, 50))} ms "
            f"(target {TARGETS['accept_ms']:g});  worker finished -> completed p50 {ms(percentile(collect, 50))} ms "
            f"(target {TARGETS['collect_ms']:g})"
        )
    load = os.getloadavg()
    print(f"\nLoad average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs and shorter saturation (about a minute)"
    )
    parser.add_argument("--comfyui", action="append", help="a running ComfyUI server (repeat for 4 workers)")
    parser.add_argument("--runs", type=int, default=300, help="latency samples per side")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one saturated run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="saturated runs per side, interleaved (short ones: the machine drifts)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients per worker")
    parser.add_argument(
        "--prompt-time",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds each emulated prompt takes, without this machine's CPU (default 0: overhead only)",
    )
    parser.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="also measure the comfyfleet that this interpreter runs (another checkout's .venv/bin/python)",
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup, args.seconds, args.rounds = 60, 10, 1.0, 3
    if args.comfyui:
        one = await measure(args.comfyui[:1], [], args)
        four = await measure(args.comfyui[:4], [], args) if len(args.comfyui) >= 4 else None
        print(f"server: {', '.join(args.comfyui)} (worker CPU is not measured for a server given by URL)")
    else:
        with emulator_processes(4, "--prompt-time", str(args.prompt_time)) as emulators:
            pids = [e.popen.pid for e in emulators]
            one = await measure([emulators[0].url], pids[:1], args)
            four = await measure([e.url for e in emulators], pids, args)
        print(f"server: comfyfleet emulators, one process each, {args.prompt_time * 1000:g} ms per prompt")
    report(one, four, args)


if __name__ == "__main__":
    asyncio.run(main())
