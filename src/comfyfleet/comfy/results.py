"""What a ComfyUI server answers, as values: a submission, its queue, and a finished prompt's outcome read
from its history entry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# ``/api/jobs/{id}`` statuses after which the prompt's history entry is final.
TERMINAL_JOB_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class SubmitResult:
    prompt_id: str
    number: float
    node_errors: dict[str, Any]


@dataclass(frozen=True, slots=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> QueueItem:
        return cls(
            item[0],
            item[1],
            item[2],
            item[3] if len(item) > 3 else {},
            list(item[4]) if len(item) > 4 else [],
        )


@dataclass(frozen=True, slots=True)
class QueueState:
    running: list[QueueItem]
    pending: list[QueueItem]  # in run order (sorted by number), not upstream's heap order

    @property
    def remaining(self) -> int:
        return len(self.running) + len(self.pending)

    def __contains__(self, prompt_id: object) -> bool:
        return any(item.prompt_id == prompt_id for item in (*self.running, *self.pending))

    def is_running(self, prompt_id: str) -> bool:
        return any(item.prompt_id == prompt_id for item in self.running)


@dataclass(frozen=True, slots=True)
class PromptTimings:
    """Epoch milliseconds from the server's clock (``None`` when unknown)."""

    created_ms: int | None
    started_ms: int | None
    ended_ms: int | None

    @property
    def queued_s(self) -> float | None:
        if self.created_ms is None or self.started_ms is None:
            return None
        return max(0.0, (self.started_ms - self.created_ms) / 1000)

    @property
    def execution_s(self) -> float | None:
        if self.started_ms is None or self.ended_ms is None:
            return None
        return max(0.0, (self.ended_ms - self.started_ms) / 1000)


@dataclass(frozen=True, slots=True)
class PromptOutcome:
    prompt_id: str
    status: Literal["success", "error", "interrupted"]
    outputs: dict[str, Any]
    error: dict[str, Any] | None
    history: dict[str, Any]
    timings: PromptTimings

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def files(self) -> list[dict[str, Any]]:
        """Every ``{filename, subfolder, type}`` in the outputs, with ``node_id`` and ``kind`` (``images``…)."""
        return [
            {**item, "node_id": node_id, "kind": kind}
            for node_id, ui in self.outputs.items()
            if isinstance(ui, dict)
            for kind, items in ui.items()
            if isinstance(items, list)
            for item in items
            if isinstance(item, dict) and "filename" in item
        ]


def outcome_from_history(prompt_id: str, entry: dict[str, Any]) -> PromptOutcome:
    """Read a history entry: an interrupted prompt also says ``status_str: "error"``; its last message tells."""
    status = entry.get("status") or {}
    messages = [m for m in status.get("messages") or [] if isinstance(m, list | tuple) and len(m) == 2]
    kinds = {m[0]: m[1] for m in messages if isinstance(m[1], dict)}
    result: Literal["success", "error", "interrupted"]
    error = None
    if status.get("status_str") == "success":
        result = "success"
    elif "execution_interrupted" in kinds:
        result = "interrupted"
        error = kinds["execution_interrupted"]
    else:
        result = "error"
        error = kinds.get("execution_error")
    prompt = entry.get("prompt") or []
    extra_data = prompt[3] if len(prompt) > 3 and isinstance(prompt[3], dict) else {}
    start = kinds.get("execution_start", {}).get("timestamp")
    end = messages[-1][1].get("timestamp") if messages and isinstance(messages[-1][1], dict) else None
    return PromptOutcome(
        prompt_id=prompt_id,
        status=result,
        outputs=dict(entry.get("outputs") or {}),
        error=error,
        history=entry,
        timings=PromptTimings(extra_data.get("create_time"), start, end),
    )


def outcome_from_frames(prompt_id: str, frames: Sequence[Any]) -> PromptOutcome | None:
    """A successful prompt's outcome from every frame its socket carried (``ComfyEvent``s from submission to
    ``executing{node: null}``), as its history entry would give it: each output node's ``executed`` output
    (cached output nodes replay theirs) and the start and success times. None unless the frames tell it all
    (an ``execution_start`` and an ``execution_success``, no error or interrupt): then read the history."""
    outputs: dict[str, Any] = {}
    times: dict[str, dict[str, Any]] = {}
    for frame in frames:
        data = frame.data if isinstance(frame.data, dict) else {}
        if frame.type == "executed" and data.get("node") is not None:
            if isinstance(data.get("output"), dict):
                outputs[str(data["node"])] = data["output"]
        elif frame.type in ("execution_start", "execution_cached", "execution_success"):
            times[frame.type] = data
        elif frame.type in ("execution_error", "execution_interrupted"):
            return None
    if "execution_start" not in times or "execution_success" not in times:
        return None
    start, end = times["execution_start"].get("timestamp"), times["execution_success"].get("timestamp")
    messages = [
        [kind, times[kind]]
        for kind in ("execution_start", "execution_cached", "execution_success")
        if kind in times
    ]
    entry = {"outputs": outputs, "status": {"status_str": "success", "completed": True, "messages": messages}}
    return PromptOutcome(
        prompt_id=prompt_id,
        status="success",
        outputs=outputs,
        error=None,
        history=entry,
        timings=PromptTimings(
            None, start if isinstance(start, int) else None, end if isinstance(end, int) else None
        ),
    )
