"""The task service: submit, cancel and re-prioritise tasks, the same way for every front door.

``TaskService`` carries out the commands of ``tasks.commands`` and refuses them with the errors of
``tasks.errors``; ``tasks.checks`` holds what a submission is checked for. Two read-side helpers live here
too, shared by the front doors: ``WorkerCatalogue`` (the fleet's node catalogue, which ``GraphCheck.FLEET``
checks graphs against) and ``StartEstimator`` (when a pending task will likely start).
"""

from comfyfleet.tasks.catalogue import WorkerCatalogue
from comfyfleet.tasks.commands import (
    CancelTask,
    ChangePriority,
    GraphCheck,
    Idempotency,
    OnReuse,
    StoredInput,
    SubmitTask,
    Submitted,
)
from comfyfleet.tasks.errors import (
    IdempotencyConflict,
    Problem,
    Rejected,
    TaskCommandError,
    TaskNotFound,
    TaskStateConflict,
)
from comfyfleet.tasks.eta import StartEstimator
from comfyfleet.tasks.service import TaskService

__all__ = [
    "CancelTask",
    "ChangePriority",
    "GraphCheck",
    "Idempotency",
    "IdempotencyConflict",
    "OnReuse",
    "Problem",
    "Rejected",
    "StartEstimator",
    "StoredInput",
    "SubmitTask",
    "Submitted",
    "TaskCommandError",
    "TaskNotFound",
    "TaskService",
    "TaskStateConflict",
    "WorkerCatalogue",
]
