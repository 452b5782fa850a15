"""What ComfyClient costs on top of the bare ComfyUI protocol, measured side by side in one run.

    .venv/bin/python bench/comfy_client.py [--runs 300] [--url http://127.0.0.1:8188]

Without --url it starts ``comfyfleet emulator`` as a child process on a free port. Each iteration runs one
trivial prompt (EmptyImage -> SaveImage, a new colour every time so the node cache never serves it)
twice, alternating which goes first:

* bare: httpx POST /prompt with the client_id of one raw websockets connection, wait for
  ``executing{node: null}`` of that prompt, then GET /history/{id} (the outputs are collected);
* client: ``ComfyClient.submit`` then ``ComfyClient.follow`` (which does the same, plus routing, buffering,
  the watchdog and parsing the outcome).

Both use the same libraries (httpx, websockets), so the difference is the client's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import time
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from comfyfleet.comfy import ComfyClient

LIMIT_MS = 2.0


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench/trivial"}},
    }


class Bare:
    """The protocol by hand: one socket, one HTTP client, nothing else."""

    def __init__(self, url: str, http: httpx.AsyncClient, ws: ClientConnection, client_id: str) -> None:
        self.url, self.http, self.ws, self.client_id = url, http, ws, client_id

    async def run(self, color: int) -> tuple[float, float]:
        prompt_id = str(uuid.uuid4())
        started = time.perf_counter()
        response = await self.http.post(
            "/prompt", json={"prompt": graph(color), "prompt_id": prompt_id, "client_id": self.client_id}
        )
        accepted = time.perf_counter()
        response.raise_for_status()
        while True:
            frame = await self.ws.recv()
            if isinstance(frame, bytes):
                continue
            message = json.loads(frame)
            data = message.get("data", {})
            if (
                message.get("type") == "executing"
                and data.get("node") is None
                and data.get("prompt_id") == prompt_id
            ):
                break
        entry = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        if not entry["outputs"]["2"]["images"]:
            raise SystemExit(f"prompt {prompt_id} did not produce its image")
        return (accepted - started) * 1000, (time.perf_counter() - started) * 1000


async def client_run(comfy: ComfyClient, color: int) -> tuple[float, float]:
    prompt_id = str(uuid.uuid4())
    started = time.perf_counter()
    await comfy.submit(graph(color), prompt_id=prompt_id)
    accepted = time.perf_counter()
    outcome = await comfy.follow(prompt_id)
    if not (outcome.ok and outcome.outputs["2"]["images"]):
        raise SystemExit(f"prompt {prompt_id} did not produce its image: {outcome.status}")
    return (accepted - started) * 1000, (time.perf_counter() - started) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def start_emulator() -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "emulator", "--port", str(port), "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = (await process.stdout.readline()).decode()
    if "listening" not in line:
        raise SystemExit(f"emulator did not start: {line!r}")
    return process, f"http://127.0.0.1:{port}"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--url", help="an already running ComfyUI (or emulator); default: start the emulator")
    args = parser.parse_args()
    process = None
    url = args.url
    if url is None:
        process, url = await start_emulator()
    try:
        bare_id = uuid.uuid4().hex
        async with (
            httpx.AsyncClient(base_url=url) as http,
            connect(
                url.replace("http", "ws", 1) + f"/ws?clientId={bare_id}", compression=None, max_size=None
            ) as ws,
            ComfyClient(url) as comfy,
        ):
            bare = Bare(url, http, ws, bare_id)
            results: dict[str, list[tuple[float, float]]] = {"bare": [], "client": []}
            rng = random.Random(1)
            for iteration in range(args.warmup + args.runs):
                order = ["bare", "client"] if iteration % 2 == 0 else ["client", "bare"]
                for kind in order:
                    color = rng.randrange(0xFFFFFF)
                    sample = await (bare.run(color) if kind == "bare" else client_run(comfy, color))
                    if iteration >= args.warmup:
                        results[kind].append(sample)
    finally:
        if process is not None:
            process.terminate()
            await process.wait()

    print(
        f"server: {url if args.url else 'comfyfleet emulator (child process)'}; trivial workflow; {args.runs} runs each, interleaved"
    )
    print(
        f"{'':8} {'accepted p50':>13} {'done p50':>9} {'done p99':>9} {'done mean':>10}  (ms, submit -> accepted / submit -> done + history)"
    )
    summary: dict[str, tuple[float, float]] = {}
    for kind in ("bare", "client"):
        accepted = [a for a, _ in results[kind]]
        done = [d for _, d in results[kind]]
        summary[kind] = (percentile(done, 0.5), percentile(done, 0.99))
        print(
            f"{kind:8} {percentile(accepted, 0.5):13.2f} {summary[kind][0]:9.2f} {summary[kind][1]:9.2f} {statistics.fmean(done):10.2f}"
        )
    overhead = summary["client"][0] - summary["bare"][0]
    ratio = summary["client"][0] / summary["bare"][0]
    verdict = "within" if overhead <= LIMIT_MS else "OVER"
    print(
        f"client overhead at p50: {overhead:+.2f} ms (x{ratio:.2f}); {verdict} the {LIMIT_MS:.0f} ms budget"
    )


if __name__ == "__main__":
    asyncio.run(main())
