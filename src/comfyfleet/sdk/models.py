"""What the SDK hands back: tasks, their outputs and live events, parsed from the server's JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Output:
    """One output file comfyfleet collected for a task. ``url`` is relative to the server."""

    node_id: str
    kind: str  # images, gifs, latents, audio…
    filename: str
    url: str
    content_type: str = "application/octet-stream"
    size: int | None = None
    subfolder: str = ""
    type: str = "output"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Output:
        return cls(
            node_id=str(raw.get("node_id", "")),
            kind=str(raw.get("kind", "")),
            filename=str(raw.get("filename", "")),
            url=str(raw.get("url", "")),
            content_type=str(raw.get("content_type") or "application/octet-stream"),
            size=raw.get("size") if isinstance(raw.get("size"), int) else None,
            subfolder=str(raw.get("subfolder") or ""),
            type=str(raw.get("type") or "output"),
        )


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the server reported it. ``raw`` keeps the whole JSON (every field, including new ones)."""

    id: str
    status: str
    priority: int
    raw: dict[str, Any] = field(repr=False)
    workflow_id: str | None = None
    phase: str | None = None
    pool: str | None = None
    worker_id: str | None = None
    queue_position: int | None = None
    estimated_start_s: float | None = None
    progress: dict[str, Any] | None = None
    attempt: int = 0
    retry_count: int = 0
    error: str | None = None
    error_kind: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Task:
        return cls(
            id=str(raw["id"]),
            status=str(raw.get("status", "")),
            priority=int(raw.get("priority") or 0),
            raw=raw,
            workflow_id=raw.get("workflow_id"),
            phase=raw.get("phase"),
            pool=raw.get("pool"),
            worker_id=raw.get("worker_id"),
            queue_position=raw.get("queue_position"),
            estimated_start_s=raw.get("estimated_start_s"),
            progress=raw.get("progress"),
            attempt=int(raw.get("attempt") or 0),
            retry_count=int(raw.get("retry_count") or 0),
            error=raw.get("error"),
            error_kind=raw.get("error_kind"),
            created_at=_time(raw.get("created_at")),
            started_at=_time(raw.get("started_at")),
            completed_at=_time(raw.get("completed_at")),
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def payload(self) -> dict[str, Any] | None:
        """The workflow graph; None in a list fetched without ``include_payload``."""
        payload = self.raw.get("payload")
        return payload if isinstance(payload, dict) else None

    @property
    def result(self) -> dict[str, Any] | None:
        result = self.raw.get("result")
        return result if isinstance(result, dict) else None

    @property
    def outputs(self) -> list[Output]:
        """The output files of a completed task (empty otherwise)."""
        items = (self.result or {}).get("outputs")
        return (
            [Output.from_json(item) for item in items if isinstance(item, dict)]
            if isinstance(items, list)
            else []
        )

    @property
    def error_details(self) -> dict[str, Any]:
        details = self.raw.get("error_details")
        return details if isinstance(details, dict) else {}

    @property
    def node_errors(self) -> dict[str, Any]:
        """ComfyUI's ``node_errors`` when a worker rejected the workflow (node id → errors), else ``{}``."""
        found = self.error_details.get("node_errors")
        return found if isinstance(found, dict) else {}

    @property
    def webhook_deliveries(self) -> list[dict[str, Any]]:
        found = self.raw.get("webhook_deliveries")
        return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []

    def raise_for_status(self) -> Task:
        """Raise :class:`~comfyfleet.sdk.errors.TaskFailed` for a failed or cancelled task; else return it."""
        from comfyfleet.sdk.errors import TaskFailed

        if self.status in {"failed", "cancelled"}:
            raise TaskFailed(self)
        return self


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One live event of a task: ``snapshot`` (``task`` is set), ``queue_position``, ``status`` or
    ``progress``. ``data`` is the event's JSON."""

    type: str
    data: dict[str, Any]
    task: Task | None = None

    @property
    def task_id(self) -> str | None:
        if self.task is not None:
            return self.task.id
        value = self.data.get("task_id")
        return str(value) if value is not None else None

    @property
    def status(self) -> str | None:
        if self.task is not None:
            return self.task.status
        value = self.data.get("status")
        return str(value) if value is not None else None

    @property
    def is_terminal(self) -> bool:
        return self.type in {"status", "snapshot"} and self.status in TERMINAL
