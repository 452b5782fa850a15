"""Workers: one ComfyUI server that can run prompts, and its lifecycle.

``pending → starting → idle ⇄ busy → draining → terminating → terminated``, plus ``failed``.
A worker is ``idle``/``busy`` only after a real ComfyUI health probe answered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class WorkerState(enum.StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


LIVE_WORKER_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})

_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.PENDING: frozenset({WorkerState.STARTING, WorkerState.TERMINATING, WorkerState.FAILED}),
    WorkerState.STARTING: frozenset(
        {WorkerState.IDLE, WorkerState.BUSY, WorkerState.TERMINATING, WorkerState.FAILED}
    ),
    WorkerState.IDLE: frozenset(
        {WorkerState.BUSY, WorkerState.DRAINING, WorkerState.TERMINATING, WorkerState.FAILED}
    ),
    WorkerState.BUSY: frozenset(
        {WorkerState.IDLE, WorkerState.DRAINING, WorkerState.TERMINATING, WorkerState.FAILED}
    ),
    # Back to idle/busy: an operator's undrain (a drained static worker is never terminated otherwise).
    WorkerState.DRAINING: frozenset(
        {WorkerState.IDLE, WorkerState.BUSY, WorkerState.TERMINATING, WorkerState.FAILED}
    ),
    WorkerState.TERMINATING: frozenset({WorkerState.TERMINATED, WorkerState.FAILED}),
    WorkerState.TERMINATED: frozenset(),
    WorkerState.FAILED: frozenset({WorkerState.TERMINATING, WorkerState.TERMINATED}),
}


def can_transition_worker(current: WorkerState, target: WorkerState) -> bool:
    return current == target or target in _ALLOWED[current]


@dataclass(slots=True)
class Worker:
    """A worker as the store holds it: the seed's Worker fields plus pool, provider and capabilities."""

    id: str
    pool: str
    provider: str
    state: WorkerState
    created_at: datetime
    updated_at: datetime
    endpoint: str | None = None  # base URL of its ComfyUI, once known
    provider_id: str | None = None  # container id, instance id, pid… reported at create time
    current_task_ids: list[str] = field(default_factory=list)
    last_active_at: datetime | None = None
    health_failures: int = 0
    loaded_models: list[str] = field(default_factory=list)
    node_types: list[str] | None = None  # None until object_info was read
    error: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int | None:
        if not self.endpoint:
            return None
        tail = self.endpoint.rstrip("/").rsplit(":", 1)
        return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None

    @property
    def health_status(self) -> bool:
        return self.state in LIVE_WORKER_STATES and self.health_failures == 0


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    total_workers: int
    idle_workers: int
    running_workers: int
    starting_workers: int
    failed_workers: int
    pending_workers: int
    terminating_workers: int
