"""Tasks: one workflow run a user asked for, and the rules of its lifecycle.

Public ``status`` is the seed's five values; inside ``running`` the ``phase`` says more.
A retry puts a task back to ``pending`` with ``not_before`` set.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskPhase(enum.StrEnum):
    DISPATCHING = "dispatching"  # claimed, prompt not yet accepted by the worker
    FETCHING_MODELS = "fetching_models"  # the task's model files are being put on the chosen worker
    QUEUED_ON_WORKER = "queued_on_worker"
    EXECUTING = "executing"


TERMINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

_ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.PENDING, TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


def can_transition(current: TaskStatus, target: TaskStatus) -> bool:
    """Whether a task in ``current`` may move to ``target`` (terminal statuses are final)."""
    return target in _ALLOWED[current]


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a submission carries before the store assigns ids and times."""

    payload: dict[str, Any]
    workflow_id: str | None = None
    priority: int = 0
    max_retries: int = 3
    timeout_s: float = 1800.0
    tenant: str = "default"
    idempotency_key: str | None = None
    pool: str | None = None
    inputs: list[dict[str, Any]] | None = None
    webhook: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    models: list[dict[str, Any]] | None = None  # model files the task brings: {url, sha256, folder, name}
    # A caller-chosen id (a canonical lowercase UUID), e.g. a ComfyUI client's own prompt_id through the
    # gateway; None lets the store mint one. A duplicate id is refused by the store's unique index.
    id: str | None = None


@dataclass(slots=True)
class Task:
    """A task as the store holds it. Every field of the seed's ``Task`` plus what the lifecycle needs."""

    id: str
    seq: int  # store-assigned, strictly increasing: FIFO order within a priority and paging cursor
    workflow_id: str | None
    priority: int
    status: TaskStatus
    payload: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    tenant: str = "default"
    phase: TaskPhase | None = None
    worker_id: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_kind: str | None = None
    error_details: dict[str, Any] | None = None
    retry_count: int = 0
    max_retries: int = 3
    attempt: int = 0  # the fencing token: 0 until first claimed, +1 per claim
    prompt_id: str | None = None
    timeout_s: float = 1800.0
    not_before: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    pool: str | None = None
    inputs: list[dict[str, Any]] | None = None
    webhook: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    pending_tasks: int
    running_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    oldest_pending_age_s: float | None
