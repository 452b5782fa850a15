"""The ComfyUI client (HTTP + one WebSocket per worker) and ComfyUI-side graph validation and inspection."""

from comfyfleet.comfy.client import (
    ComfyClient,
    PromptOutcome,
    PromptTimings,
    QueueItem,
    QueueState,
    SubmitResult,
    outcome_from_history,
)
from comfyfleet.comfy.errors import (
    ClientStateError,
    ComfyError,
    ComfyTimeout,
    MalformedPrompt,
    OutputNotFound,
    PromptLost,
    UnexpectedResponse,
    WorkerUnreachable,
    WorkflowRejected,
)
from comfyfleet.comfy.events import ComfyEvent

__all__ = [
    "ClientStateError",
    "ComfyClient",
    "ComfyError",
    "ComfyEvent",
    "ComfyTimeout",
    "MalformedPrompt",
    "OutputNotFound",
    "PromptLost",
    "PromptOutcome",
    "PromptTimings",
    "QueueItem",
    "QueueState",
    "SubmitResult",
    "UnexpectedResponse",
    "WorkerUnreachable",
    "WorkflowRejected",
    "outcome_from_history",
]
