"""Pure domain model: tasks, workers, their statuses and allowed transitions, assets. Imports nothing of ours."""

from comfyfleet.domain.assets import Asset, Blob, ModelFile, StoredFile
from comfyfleet.domain.tasks import (
    TERMINAL_STATUSES,
    NewTask,
    QueueMetrics,
    Task,
    TaskPhase,
    TaskStatus,
    can_transition,
)
from comfyfleet.domain.workers import (
    LIVE_WORKER_STATES,
    Worker,
    WorkerMetrics,
    WorkerState,
    can_transition_worker,
)

__all__ = [
    "LIVE_WORKER_STATES",
    "TERMINAL_STATUSES",
    "Asset",
    "Blob",
    "ModelFile",
    "NewTask",
    "QueueMetrics",
    "StoredFile",
    "Task",
    "TaskPhase",
    "TaskStatus",
    "Worker",
    "WorkerMetrics",
    "WorkerState",
    "can_transition",
    "can_transition_worker",
]
