"""Submission throughput through the HTTP API, and claim cost / server memory against queue depth.

Starts ``comfyfleet serve`` as a subprocess on SQLite (a temporary directory) and then on PostgreSQL (a
fresh database on the local server), and prints, side by side:

1. submissions per second of the seed's example workflow through ``POST /api/v1/tasks``, driven by a
   concurrent load generator on this machine (raw HTTP/1.1 keep-alive connections on asyncio, so the
   generator costs little CPU next to the server it measures), with latency percentiles;
2. with 0 and then 100,000 tasks pending (inserted through the store directly): the median time to
   claim one task as the dispatcher does (``peek_pending`` then ``claim_ids``), the time of a submission,
   a ``GET`` of a task and ``/queue/metrics``, and the server's resident memory.

Usage: ``.venv/bin/python bench/submit.py [--seconds 10] [--connections 64] [--depth 100000]``
(``--postgres URL`` names a database on the server to connect through; ``--skip-postgres`` to omit it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

from comfyfleet.domain import NewTask
from comfyfleet.store import Store, open_store

ROOT = Path(__file__).resolve().parents[1]
SEED_BODY = json.loads((ROOT / "tests" / "support" / "data" / "seed_task.json").read_text())
LISTENING = re.compile(r"api_listening url=(http://\S+)")
TARGETS_PER_S = {"sqlite": 3000, "postgresql": 2000}  # issue 11, 64 connections on a 2-core machine


# -- the server under test ------------------------------------------------------------------------


class Server:
    """``comfyfleet serve`` in a subprocess, on a port the OS picks."""

    def __init__(self, store_url: str, workdir: Path, label: str) -> None:
        self.log_path = workdir / f"serve-{label}.log"
        self._log = self.log_path.open("wb")
        env = {name: value for name, value in os.environ.items() if not name.startswith("COMFYFLEET_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "comfyfleet", "serve", "--port", "0", "--store", store_url],
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = ""
        self.host = ""
        self.port = 0

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"serve exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            if not self.url:
                match = LISTENING.search(self.log_path.read_text(errors="replace"))
                if match:
                    self.url = match[1]
                    parts = urlsplit(self.url)
                    self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
            if self.url:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                        return
            time.sleep(0.05)
        raise SystemExit(f"serve was not ready within {timeout_s} s:\n{self.log_path.read_text()}")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process (all its threads) has used so far."""
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def rss_mib(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss) / 2**20

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_server(store_url: str, workdir: Path, label: str) -> Iterator[Server]:
    server = Server(store_url, workdir, label)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- the load generator ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    seconds: float
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def submission_request(host: str, port: int) -> bytes:
    body = json.dumps(SEED_BODY, separators=(",", ":")).encode()
    head = (
        f"POST /api/v1/tasks HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def drive(host: str, port: int, connections: int, seconds: float) -> LoadResult:
    """``connections`` keep-alive connections, each sending the next submission when the last is answered."""
    request = submission_request(host, port)
    result = LoadResult(seconds=seconds)
    start = time.perf_counter()
    stop_at = start + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (sent := time.perf_counter()) < stop_at:
                writer.write(request)
                status = await _read_response(reader)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 201:
                    result.ok += 1
                    result.latencies.append(time.perf_counter() - sent)
                else:
                    result.failed += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async with asyncio.TaskGroup() as group:
        for index in range(connections):
            group.create_task(connection(), name=f"connection-{index}")
    result.seconds = time.perf_counter() - start
    return result


# -- stores ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_postgres_database(admin_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of ``admin_url``; dropped afterwards."""
    import asyncpg

    name = f"comfyfleet_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(admin_url)
        try:
            yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def store_for(kind: str, workdir: Path, postgres_url: str, label: str) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.db'}"
    else:
        async with fresh_postgres_database(postgres_url) as url:
            yield url


async def fill(store: Store, count: int, *, batch: int = 500) -> float:
    """Insert ``count`` pending tasks (the seed workflow, mixed priorities) concurrently; return seconds."""
    started = time.perf_counter()
    for offset in range(0, count, batch):
        size = min(batch, count - offset)
        await asyncio.gather(
            *(
                store.create_task(
                    NewTask(
                        payload=SEED_BODY["payload"], workflow_id="bench-fill", priority=(offset + index) % 10
                    )
                )
                for index in range(size)
            )
        )
    return time.perf_counter() - started


async def median_s(action: Callable[[], Any], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        await action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


# -- the two measurements -------------------------------------------------------------------------


async def measure_throughput(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with store_for(kind, workdir, args.postgres, f"{kind}-throughput") as url:
        with running_server(url, workdir, f"{kind}-throughput") as server:
            await drive(server.host, server.port, args.connections, 1.0)  # warm-up
            server_cpu, generator_cpu = server.cpu_s(), time.process_time()
            result = await drive(server.host, server.port, args.connections, args.seconds)
            server_cpu, generator_cpu = server.cpu_s() - server_cpu, time.process_time() - generator_cpu
            rss = server.rss_mib()
    return {
        "result": result,
        "rss_mib": rss,
        "server_cpu_per_request_s": server_cpu / max(result.ok, 1),
        "generator_cpu_per_request_s": generator_cpu / max(result.ok, 1),
        "load": os.getloadavg()[0],
    }


async def measure_depth(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with store_for(kind, workdir, args.postgres, f"{kind}-depth") as url:
        with running_server(url, workdir, f"{kind}-depth") as server:
            async with open_store(url) as store, httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                owner = f"bench-{uuid.uuid4().hex[:6]}"

                async def claim_one() -> None:
                    head = await store.peek_pending(limit=1)
                    claimed = await store.claim_ids(owner, 30.0, [task.id for task in head])
                    assert len(claimed) == 1, "nothing to claim"

                async def submit() -> None:
                    response = await client.post("/api/v1/tasks", json=SEED_BODY)
                    assert response.status_code == 201, response.text

                async def claim_fresh_task() -> float:
                    await store.create_task(NewTask(payload=SEED_BODY["payload"], workflow_id="bench-depth0"))
                    started = time.perf_counter()
                    await claim_one()
                    return time.perf_counter() - started

                async def read_task(task_id: str) -> None:
                    response = await client.get(f"/api/v1/tasks/{task_id}")
                    assert response.status_code == 200, response.text

                async def read_metrics() -> None:
                    response = await client.get("/api/v1/queue/metrics")
                    assert response.status_code == 200, response.text

                async def measure(label: str, depth_claim: Callable[[], Any]) -> None:
                    figures[label] = {
                        "claim_s": await depth_claim(),
                        "submit_s": await median_s(submit, args.repeats),
                        "metrics_s": await median_s(read_metrics, min(args.repeats, 20)),
                    }
                    last = (await client.post("/api/v1/tasks", json=SEED_BODY)).json()["id"]
                    figures[label]["get_task_s"] = await median_s(
                        lambda: read_task(last), min(args.repeats, 20)
                    )
                    figures[label]["position"] = (await client.get(f"/api/v1/tasks/{last}")).json()[
                        "queue_position"
                    ]
                    figures[label]["rss_mib"] = server.rss_mib()

                async def depth0_claims() -> float:
                    return statistics.median([await claim_fresh_task() for _ in range(args.repeats)])

                await measure("depth 0", depth0_claims)
                # Clear what depth 0 left pending so the next figures are at the stated depth.
                while head := await store.peek_pending(limit=100):
                    await store.claim_ids(owner, 30.0, [task.id for task in head])
                figures["fill_s"] = await fill(store, args.depth)

                async def deep_claims() -> float:
                    return await median_s(claim_one, args.repeats)

                await measure(f"depth {args.depth:,}", deep_claims)
    return figures


def print_throughput(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    kinds = list(results)
    print(
        f"\nSubmissions through POST /api/v1/tasks (seed workflow, {args.connections} keep-alive connections, "
        f"{args.seconds:g} s, load generator on this machine, {os.cpu_count()} CPUs)"
    )
    print(f"{'':28}" + "".join(f"{kind:>14}" for kind in kinds))
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("submissions/s", lambda r: f"{r['result'].per_s:,.0f}"),
        ("latency p50 (ms)", lambda r: f"{r['result'].percentile_ms(0.50):.1f}"),
        ("latency p99 (ms)", lambda r: f"{r['result'].percentile_ms(0.99):.1f}"),
        ("accepted (201)", lambda r: f"{r['result'].ok:,}"),
        ("other answers", lambda r: f"{r['result'].failed:,}"),
        ("server RSS after (MiB)", lambda r: f"{r['rss_mib']:.0f}"),
        # CPU per request does not depend on what else the machine runs, unlike the rate above.
        ("server CPU/submission (ms)", lambda r: f"{r['server_cpu_per_request_s'] * 1000:.2f}"),
        ("  = one-core capacity (/s)", lambda r: f"{1 / r['server_cpu_per_request_s']:,.0f}"),
        ("generator CPU/request (ms)", lambda r: f"{r['generator_cpu_per_request_s'] * 1000:.2f}"),
        ("load average at the end", lambda r: f"{r['load']:.1f}"),
    ]
    for label, cell in rows:
        print(f"{label:28}" + "".join(f"{cell(results[kind]):>14}" for kind in kinds))
    for kind in kinds:
        rate, target = results[kind]["result"].per_s, TARGETS_PER_S[kind]
        verdict = "meets" if rate >= target else "MISSES"
        print(f"{kind} {verdict} the target of {target:,}/s ({rate / target:.2f}x)")
    if len(kinds) == 2:
        print(
            f"PostgreSQL / SQLite: {results[kinds[1]]['result'].per_s / max(results[kinds[0]]['result'].per_s, 1):.2f}x"
        )


def print_depth(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    deep = f"depth {args.depth:,}"
    print(
        f"\nQueue depth: median of {args.repeats} claims (peek_pending + claim_ids, one task) and of HTTP calls, "
        f"at 0 and {args.depth:,} pending tasks"
    )
    columns = [(kind, label) for kind in results for label in ("depth 0", deep)]
    names = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    print(
        f"{'':28}"
        + "".join(f"{names.get(kind, kind) + ' @' + label.split()[-1]:>20}" for kind, label in columns)
    )
    rows: list[tuple[str, str, Callable[[float], str]]] = [
        ("claim one (ms)", "claim_s", lambda v: f"{v * 1000:.2f}"),
        ("POST /tasks (ms)", "submit_s", lambda v: f"{v * 1000:.2f}"),
        ("GET /tasks/{id} (ms)", "get_task_s", lambda v: f"{v * 1000:.2f}"),
        ("GET /queue/metrics (ms)", "metrics_s", lambda v: f"{v * 1000:.2f}"),
        ("queue_position of newest", "position", lambda v: f"{v:,}"),
        ("server RSS (MiB)", "rss_mib", lambda v: f"{v:.0f}"),
    ]
    for label, key, cell in rows:
        print(f"{label:28}" + "".join(f"{cell(results[kind][depth][key]):>20}" for kind, depth in columns))
    for kind in results:
        shallow, deep_figures = results[kind]["depth 0"], results[kind][deep]
        print(
            f"{kind}: claim {deep_figures['claim_s'] / shallow['claim_s']:.2f}x, "
            f"RSS {deep_figures['rss_mib'] / shallow['rss_mib']:.2f}x at {args.depth:,} vs 0 "
            f"(filling took {results[kind]['fill_s']:.1f} s through the store)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections")
    parser.add_argument("--depth", type=int, default=100_000, help="pending tasks for the depth figures")
    parser.add_argument("--repeats", type=int, default=100, help="samples per median")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("COMFYFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-depth", action="store_true", help="only measure submission throughput")
    args = parser.parse_args()

    kinds = ["sqlite"] if args.skip_postgres else ["sqlite", "postgresql"]
    workdir = Path(tempfile.mkdtemp(prefix="comfyfleet-bench-"))
    try:
        throughput = {kind: await measure_throughput(kind, workdir, args) for kind in kinds}
        print_throughput(throughput, args)
        if not args.skip_depth:
            depth = {kind: await measure_depth(kind, workdir, args) for kind in kinds}
            print_depth(depth, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
