"""A rough estimate of when a pending task will start, for ``GET /api/v1/tasks/{id}``.

The queue position alone does not say how long a wait is: a position of 10 is seconds on a busy fleet of fast
workers and minutes on one slow worker. The task starts at once if an idle worker that can take it is left for
it; otherwise after enough of the ready workers' tasks have completed:

    start_in_s = max(0, position - idle workers) / ready workers x mean execution time of recent tasks

It is an estimate "as things stand": a higher-priority task submitted later moves the task back, an autoscaled
pool adding workers moves it forward. It is null when there is nothing to base it on (no ready worker, or no
completed task yet). A task that brings model files the host does not hold yet starts after their download too:
the mean time of the host's recent downloads for each missing file (nothing is added before a first download).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from comfyfleet.config import Settings
from comfyfleet.dispatch.models import files_of
from comfyfleet.domain import Task, TaskStatus, WorkerState
from comfyfleet.store import Store

if TYPE_CHECKING:
    from comfyfleet.models.service import ModelService

RECENT_TASKS = 20  # completed tasks the mean execution time is taken over
TTL_S = 5.0  # how long the mean and the worker count are reused


class StartEstimator:
    def __init__(self, store: Store, settings: Settings, models: ModelService | None = None) -> None:
        self._store = store
        self._settings = settings
        self._models = models
        self._cached_at = -TTL_S
        self._mean_s: float | None = None
        self._workers_by_pool: dict[str | None, tuple[int, int]] = {}  # pool -> (ready, idle)

    async def _refresh(self) -> None:
        if time.monotonic() - self._cached_at < TTL_S:
            return
        page = await self._store.list_tasks(statuses=[TaskStatus.COMPLETED], limit=RECENT_TASKS)
        durations = [
            float(task.result["timings"]["executing_s"])
            for task in page.tasks
            if isinstance(task.result, dict) and isinstance(task.result.get("timings"), dict)
            and isinstance(task.result["timings"].get("executing_s"), int | float)
        ]  # fmt: skip
        self._mean_s = statistics.fmean(durations) if durations else None
        counts: dict[str | None, tuple[int, int]] = {}
        for worker in await self._store.list_workers():
            if worker.state in (WorkerState.IDLE, WorkerState.BUSY):
                ready, idle = counts.get(worker.pool, (0, 0))
                counts[worker.pool] = (ready + 1, idle + (worker.state is WorkerState.IDLE))
        self._workers_by_pool = counts
        self._cached_at = time.monotonic()

    def _pools_for(self, task: Task) -> set[str | None] | None:
        """The pools whose workers may run ``task`` (None: any): the one it names, or those carrying it as a label."""
        if task.pool is None:
            return None
        pools: set[str | None] = {task.pool}
        pools.update(pool.name for pool in self._settings.pools if task.pool in pool.labels)
        return pools

    async def start_in_s(self, task: Task, position: int | None) -> float | None:
        """Seconds until ``task`` (pending at ``position``) is likely to start; None when unknown."""
        if position is None:
            return None
        await self._refresh()
        pools = self._pools_for(task)
        usable = [counts for pool, counts in self._workers_by_pool.items() if pools is None or pool in pools]
        ready, idle = sum(count[0] for count in usable), sum(count[1] for count in usable)
        if self._mean_s is None or ready == 0:
            return None
        fetching = self._models.fetch_estimate_s(files_of(task)) if self._models is not None else 0.0
        return round(max(0, position - idle) / ready * self._mean_s + fetching, 1)
