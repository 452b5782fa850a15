"""Helpers of the recovery tests: a ``comfyfleet serve`` config for replicas, a burst of submissions, and
what the emulators executed. (The server itself is ``support.ServeProcess`` or ``support.running_fleet``.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from comfyfleet.emulators.comfyui.server import EmulatorServer
from support import tiny_workflow


async def queue_metrics(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    metrics: dict[str, Any] = (await http.get(f"{url}/api/v1/queue/metrics")).json()
    return metrics


def serve_config(
    tmp_path: Path, workers: list[str], store: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "store": store or f"sqlite:///{tmp_path / 'comfyfleet.db'}",
        "outputs": str(tmp_path / "outputs"),
        "workers": workers,
        "dispatch": {"lease_s": 3.0, "retry_base_s": 0.05, "retry_max_s": 0.5},
        "fleet": {"probe_interval_s": 0.2, "reconcile_interval_s": 0.2},
        **extra,
    }


async def submit_all(
    http: httpx.AsyncClient, urls: list[str], count: int, *, concurrency: int = 16
) -> list[str]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(n: int) -> str:
        # A dropped keep-alive connection is retried with the same Idempotency-Key, as a careful client does:
        # the retry returns the task the first try created, if it did.
        headers = {"Idempotency-Key": f"submit-{n}"}
        async with semaphore:
            for remaining in range(2, -1, -1):
                try:
                    response = await http.post(
                        f"{urls[n % len(urls)]}/api/v1/tasks",
                        json={"payload": tiny_workflow(color=n)},
                        headers=headers,
                    )
                    break
                except httpx.TransportError:
                    if not remaining:
                        raise
            assert response.status_code in {200, 201}, response.text
            return str(response.json()["id"])

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def read_tasks(http: httpx.AsyncClient, url: str, ids: list[str]) -> list[dict[str, Any]]:
    tasks = []
    for task_id in ids:
        response = await http.get(f"{url}/api/v1/tasks/{task_id}")
        assert response.status_code == 200
        tasks.append(response.json())
    return tasks


def executions(workers: list[EmulatorServer]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for worker in workers:
        counts.update(worker.stats.executions)
    return counts
