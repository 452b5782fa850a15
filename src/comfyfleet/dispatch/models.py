"""A task's own model files (``models`` on a submission): kept in the host cache while the task waits, counted
by placement (a worker whose host already holds them is preferred), and put in the chosen worker's models
folder before its prompt is sent, in the task phase ``fetching_models`` with progress events.

A file that cannot be had (a 404, the wrong sha256, a refused address, transient errors that outlasted their
retries) fails the task as ``model_unavailable``: trying it on another worker of the same host would fetch
from the same source again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfyfleet.domain import Task, Worker
from comfyfleet.models import ModelPolicy, ModelUnavailable, parse_specs
from comfyfleet.models.service import ModelService

if TYPE_CHECKING:
    from comfyfleet.config import PoolConfig
    from comfyfleet.dispatch.attempt import WorkerSlot
    from comfyfleet.dispatch.placement import PendingTask, Slot

FAILURE_KIND = "model_unavailable"
PROGRESS_INTERVAL_S = 0.5
QUEUE_HOLDER = "queue"


@dataclass(frozen=True, slots=True)
class TaskModels:
    """The host's model service and what each pool allows of the files its tasks bring."""

    service: ModelService
    policies: Mapping[str, ModelPolicy] = field(default_factory=dict)

    @classmethod
    def of(cls, service: ModelService | None, pools: Sequence[PoolConfig]) -> TaskModels | None:
        if service is None:
            return None
        return cls(service, {pool.name: pool.model_policy for pool in pools})

    def policy(self, pool: str) -> ModelPolicy:
        return self.policies.get(pool, ModelPolicy())


def files_of(task: Task) -> frozenset[str]:
    """The sha256 of the model files a task brings."""
    return frozenset(
        spec["sha256"] for spec in task.models or () if isinstance(spec, dict) and "sha256" in spec
    )


def note_model_files(
    models: TaskModels | None,
    window: Sequence[PendingTask],
    slots: Sequence[Slot],
    workers: Mapping[str, WorkerSlot],
) -> None:
    """Tell placement which workers have a models folder comfyfleet manages and which of the files of the
    tasks at the head of the queue their host already holds; pin those files in the host cache meanwhile."""
    if models is None:
        return
    wanted = frozenset().union(*(task.files for task in window))
    models.service.cache.pin(QUEUE_HOLDER, wanted)
    on_host = frozenset(sha256 for sha256 in wanted if models.service.on_host(sha256))
    for slot in slots:
        worker = workers.get(slot.worker_id)
        slot.manages_models = worker is not None and "models_dir" in worker.worker.info
        if slot.manages_models:
            slot.model_files = on_host


async def provision_task_models(
    models: TaskModels | None, task: Task, worker: Worker, report: Callable[[dict[str, Any]], Any]
) -> None:
    """Put the task's files in ``worker``'s models folder; ``report(progress)`` (a coroutine function) hears how
    it goes, at most every :data:`PROGRESS_INTERVAL_S`. Raises :class:`ModelsError` when it cannot."""
    models_dir = worker.info.get("models_dir")
    if models is None or not isinstance(models_dir, str):
        raise ModelUnavailable(f"worker {worker.id} has no models folder that comfyfleet manages")
    specs = parse_specs(task.models)
    service = models.service
    service.pin(f"task:{task.id}", specs)
    latest: dict[str, Any] = {}
    changed = asyncio.Event()

    def progress(state: dict[str, Any]) -> None:
        latest.update(state)
        changed.set()

    async def relay() -> None:
        while True:
            await changed.wait()
            changed.clear()
            await report({"models": dict(latest)})
            await asyncio.sleep(PROGRESS_INTERVAL_S)  # a rate limit, not a wait for something

    # Owned here: cancelled and awaited below, so a failing report is not lost and nothing outlives the call.
    relaying = asyncio.create_task(relay(), name=f"model-progress-{task.id}")
    try:
        await service.provision(specs, Path(models_dir), models.policy(worker.pool), progress)
    finally:
        relaying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relaying
    if latest:
        await report({"models": dict(latest)})


def release_task_models(models: TaskModels | None, task: Task) -> None:
    """The attempt ended: its files may be evicted again (unless another holder needs them)."""
    if models is not None:
        models.service.unpin(f"task:{task.id}")
