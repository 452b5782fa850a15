"""The autoscaler's decision: a pure function from a pool's snapshot and policy to actions.

:func:`decide` reads nothing and changes nothing, so it is tested table-driven without fakes; the fleet's
reconciler (``fleet/reconciler.py``) builds the snapshots from the store and carries the actions out.

Rules, per pool:
- Capacity is every worker that is ``pending``, ``starting``, ``idle`` or ``busy``: a worker still starting
  counts, so a burst does not start a second wave while the first boots.
- Wanted = ceil((runnable pending + running tasks) / tasks_per_worker), raised to ``min_workers`` and capped
  at ``max_workers``.
- Scale up by the difference unless the pool is cooling down after a scale-up, or backing off after failed
  starts (``start_backoff_base_s * 2^(failures-1)``, capped at ``start_backoff_max_s``). ``max_workers`` caps
  the instances that exist, draining, failed and stopping ones included: their replacements wait.
- Scale down only idle workers whose idle time reached ``idle_timeout_s``, longest idle first, never below
  the wanted count, and not during the scale-down cooldown. Above ``max_workers`` (the config shrank) idle
  and still-starting workers go at once. A busy worker (one with assigned tasks) is never stopped.
- ``failed`` workers are always cleaned up; ``draining`` ones once they hold no task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from comfyfleet.domain import WorkerState

if TYPE_CHECKING:
    from comfyfleet.config import FleetSettings, PoolConfig

CAPACITY_STATES = frozenset({WorkerState.PENDING, WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY})


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    min_workers: int = 0
    max_workers: int = 1
    idle_timeout_s: float = 300.0
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 0.0
    tasks_per_worker: int = 1
    start_backoff_base_s: float = 5.0
    start_backoff_max_s: float = 300.0

    @classmethod
    def for_pool(cls, pool: PoolConfig, fleet: FleetSettings) -> ScalingPolicy:
        return cls(
            min_workers=pool.min_workers,
            max_workers=pool.max_workers,
            idle_timeout_s=pool.idle_timeout_s,
            scale_up_cooldown_s=pool.scale_up_cooldown_s,
            scale_down_cooldown_s=pool.scale_down_cooldown_s,
            tasks_per_worker=fleet.tasks_per_worker,
            start_backoff_base_s=fleet.start_backoff_base_s,
            start_backoff_max_s=fleet.start_backoff_max_s,
        )


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    state: WorkerState
    created_at: datetime
    last_active_at: datetime | None = None
    busy: bool = False  # holds at least one task (assigned by a dispatcher, or running in the store)

    def idle_for_s(self, now: datetime) -> float:
        return (now - (self.last_active_at or self.created_at)).total_seconds()


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    pool: str
    now: datetime
    pending_tasks: int = 0
    running_tasks: int = 0
    workers: tuple[WorkerView, ...] = ()
    last_scale_up_at: datetime | None = None
    last_scale_down_at: datetime | None = None
    failed_starts: int = 0  # consecutive failed starts since the last worker became ready
    last_failed_start_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StartWorkers:
    pool: str
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class StopWorker:
    pool: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Not an order: why the pool wanted to grow but did not (cooldown, back-off), for logs and tests."""

    pool: str
    reason: str
    until: datetime | None = None


Action = StartWorkers | StopWorker | Hold


def start_backoff_s(failed_starts: int, policy: ScalingPolicy) -> float:
    if failed_starts <= 0:
        return 0.0
    return float(
        min(policy.start_backoff_base_s * 2 ** min(failed_starts - 1, 30), policy.start_backoff_max_s)
    )


def wanted_workers(snapshot: PoolSnapshot, policy: ScalingPolicy) -> int:
    demand = max(snapshot.pending_tasks, 0) + max(snapshot.running_tasks, 0)
    wanted = math.ceil(demand / policy.tasks_per_worker)
    return min(max(wanted, policy.min_workers), policy.max_workers)


def _seconds_since(moment: datetime | None, now: datetime) -> float:
    return math.inf if moment is None else (now - moment).total_seconds()


def decide(snapshot: PoolSnapshot, policy: ScalingPolicy) -> list[Action]:
    """What to do now for one pool (see the module docstring for the rules)."""
    actions: list[Action] = []
    for worker in snapshot.workers:
        if worker.state is WorkerState.FAILED:
            actions.append(StopWorker(snapshot.pool, worker.id, "failed"))
        elif worker.state is WorkerState.DRAINING and not worker.busy:
            actions.append(StopWorker(snapshot.pool, worker.id, "drained"))

    capacity = [worker for worker in snapshot.workers if worker.state in CAPACITY_STATES]
    target = wanted_workers(snapshot, policy)
    if target > len(capacity):
        actions.append(_scale_up(snapshot, policy, target, live=len(capacity)))
    elif len(capacity) > target:
        actions.extend(_scale_down(snapshot, policy, capacity, excess=len(capacity) - target))
    return actions


def _scale_up(snapshot: PoolSnapshot, policy: ScalingPolicy, target: int, live: int) -> Action:
    """Start the missing workers, unless backing off after failed starts or cooling down."""
    now = snapshot.now
    backoff = start_backoff_s(snapshot.failed_starts, policy)
    if snapshot.failed_starts and _seconds_since(snapshot.last_failed_start_at, now) < backoff:
        assert snapshot.last_failed_start_at is not None
        until = snapshot.last_failed_start_at + _delta(backoff)
        return Hold(snapshot.pool, f"backing off after {snapshot.failed_starts} failed start(s)", until)
    if _seconds_since(snapshot.last_scale_up_at, now) < policy.scale_up_cooldown_s:
        assert snapshot.last_scale_up_at is not None
        return Hold(
            snapshot.pool, "scale-up cooldown", snapshot.last_scale_up_at + _delta(policy.scale_up_cooldown_s)
        )
    # max_workers caps the instances that exist: a draining or stopping worker still holds its GPU and is
    # still billed, so its replacement waits until it is gone.
    existing = sum(1 for worker in snapshot.workers if worker.state is not WorkerState.TERMINATED)
    count = min(target - live, policy.max_workers - existing)
    if count <= 0:
        return Hold(snapshot.pool, f"at max_workers {policy.max_workers} until a stopping worker is gone")
    demand = snapshot.pending_tasks + snapshot.running_tasks
    return StartWorkers(snapshot.pool, count, f"demand {demand}, capacity {live}, target {target}")


def _scale_down(
    snapshot: PoolSnapshot, policy: ScalingPolicy, capacity: list[WorkerView], excess: int
) -> list[Action]:
    """Above max_workers, idle then still-starting workers go at once; below it, idle ones past their
    timeout, outside the scale-down cooldown. Never a busy one."""
    now = snapshot.now
    stops: list[Action] = []
    stopping: set[str] = set()
    # The config shrank below what runs: idle workers first, then ones still starting (newest first).
    over_max = max(len(capacity) - policy.max_workers, 0)
    if over_max:
        idle = sorted(
            (w for w in capacity if w.state is WorkerState.IDLE and not w.busy),
            key=lambda w: -w.idle_for_s(now),
        )
        booting = sorted(
            (w for w in capacity if w.state is WorkerState.STARTING and not w.busy),
            key=lambda w: w.created_at,
            reverse=True,
        )
        for worker in [*idle, *booting][:over_max]:
            stops.append(StopWorker(snapshot.pool, worker.id, f"above max_workers {policy.max_workers}"))
            stopping.add(worker.id)
        excess -= len(stopping)

    if excess <= 0 or _seconds_since(snapshot.last_scale_down_at, now) < policy.scale_down_cooldown_s:
        return stops
    expired = sorted(
        (
            w
            for w in capacity
            if w.state is WorkerState.IDLE
            and not w.busy
            and w.id not in stopping
            and w.idle_for_s(now) >= policy.idle_timeout_s
        ),
        key=lambda w: -w.idle_for_s(now),
    )
    for worker in expired[:excess]:
        reason = f"idle for {worker.idle_for_s(now):.1f}s >= {policy.idle_timeout_s}s"
        stops.append(StopWorker(snapshot.pool, worker.id, reason))
    return stops


def _delta(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
