"""How a comfyfleet task reads as a Comfy API v2 job (and its outputs as assets): the mapping, written once.

| comfyfleet task | v2 job |
| --- | --- |
| ``pending`` | ``queued``, ``queue_position`` its place in the fleet's queue (1 = next) |
| ``running``, phase ``dispatching`` or ``queued_on_worker`` | ``queued``, ``queue_position`` 0 (handed to a worker, which starts it next) |
| ``running``, phase ``executing`` | ``running`` |
| ``running`` with a cancel asked for | ``canceling`` |
| ``completed`` / ``failed`` / ``cancelled`` | ``succeeded`` / ``failed`` / ``canceled`` |

comfyfleet keeps every job (nothing expires), so ``expires_at`` is the far future and ``expired`` never occurs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from comfyfleet.domain import Task, TaskPhase, TaskStatus
from comfyfleet.domain.graph import NotAGraph, iter_links
from comfyfleet.http.wire import utc

# What "kept until removed" reads as where v2 wants a date: comfyfleet deletes no job and no asset by itself.
NEVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
_ENDED = {TaskStatus.COMPLETED: "succeeded", TaskStatus.FAILED: "failed", TaskStatus.CANCELLED: "canceled"}
# The comfyfleet statuses a v2 status can come from (to narrow a listing before the exact mapping).
TASK_STATUSES: dict[str, frozenset[TaskStatus]] = {
    "queued": frozenset({TaskStatus.PENDING, TaskStatus.RUNNING}),
    "running": frozenset({TaskStatus.RUNNING}),
    "canceling": frozenset({TaskStatus.RUNNING}),
    "succeeded": frozenset({TaskStatus.COMPLETED}),
    "failed": frozenset({TaskStatus.FAILED}),
    "canceled": frozenset({TaskStatus.CANCELLED}),
    "expired": frozenset(),
}
# The kinds of failure a task records, under the codes v2 clients match on.
_ERROR_CODES = {
    "node_error": "node_execution_error",
    "workflow_invalid": "invalid_workflow",
    "input_invalid": "invalid_input",
}
# ComfyUI's output lists (``images``, ``gifs``…) under v2's kinds of output.
_OUTPUT_KINDS = {
    "images": "image",
    "gifs": "video",
    "video": "video",
    "videos": "video",
    "audio": "audio",
    "text": "text",
    "latents": "latent",
    "3d": "file",
}


@dataclass(frozen=True, slots=True)
class Links:
    """Where this request's front door answers: ``origin`` (``scheme://host:port``) and ``prefix`` (the path
    v2 is mounted at, e.g. ``/api/v2``)."""

    origin: str
    prefix: str

    def job(self, job_id: str) -> dict[str, str]:
        base = f"{self.prefix}/jobs/{job_id}"
        return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}

    def content(self, asset_id: str) -> str:
        # Absolute: v2's clients read an asset's url as a URI of its own.
        return f"{self.origin}{self.prefix}/assets/{asset_id}/content"


def job_status(task: Task) -> str:
    if task.status is TaskStatus.PENDING:
        return "queued"
    if task.status is TaskStatus.RUNNING:
        if task.cancel_requested:
            return "canceling"
        return "running" if task.phase is TaskPhase.EXECUTING else "queued"
    return _ENDED[task.status]


def execution_started_at(task: Task) -> datetime | None:
    """When the job started running: the worker's execution start once known, else the first claim."""
    timings = (task.result or {}).get("timings") if isinstance(task.result, dict) else None
    started = timings.get("execution_started_at") if isinstance(timings, dict) else None
    if isinstance(started, str):
        try:
            return utc(datetime.fromisoformat(started))
        except ValueError:
            pass
    if task.status is TaskStatus.RUNNING and task.phase is not TaskPhase.EXECUTING:
        return None
    return utc(task.started_at)


def _millis(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))


def job_json(
    task: Task, *, queue_position: int | None, outputs: list[dict[str, Any]], links: Links
) -> dict[str, Any]:
    """The ``Job`` object of v2 for ``task``; ``outputs`` are its outputs as :func:`output_json` made them."""
    status = job_status(task)
    created = utc(task.created_at)
    started = execution_started_at(task)
    completed = utc(task.completed_at)
    return {
        "id": task.id,
        "status": status,
        "created_at": created,
        "started_at": started,
        "completed_at": completed,
        "expires_at": NEVER,
        "queue_position": queue_position if status == "queued" else None,
        "progress": progress_json(task, status),
        "outputs": outputs,
        "error": error_json(task),
        "metrics": {
            "queue_ms": _millis(created, started),
            "execution_ms": _millis(started, completed),
        },
        "urls": links.job(task.id),
        "metadata": labels_of(task),
    }


def job_summary(task: Task, links: Links) -> dict[str, Any]:
    """One job of ``GET /api/v2/jobs``: no outputs, progress or workflow (``GET /jobs/{id}`` has them)."""
    return {
        "id": task.id,
        "status": job_status(task),
        "create_time": utc(task.created_at),
        "update_time": utc(task.updated_at),
        "created_at": utc(task.created_at),
        "completed_at": utc(task.completed_at),
        "metadata": labels_of(task),
        "urls": links.job(task.id),
    }


def labels_of(task: Task) -> dict[str, str]:
    """The string labels a v2 job was submitted with (``{}`` for a task from another front door)."""
    labels = (task.metadata or {}).get("labels") if isinstance(task.metadata, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {key: value for key, value in labels.items() if isinstance(key, str) and isinstance(value, str)}


def progress_json(task: Task, status: str) -> dict[str, Any] | None:
    """v2's progress snapshot. ``nodes_done`` counts the nodes the current one depends on (they ran, or came
    from ComfyUI's cache, before it could start): a lower bound, the same on every read."""
    payload = task.payload if isinstance(task.payload, dict) else {}
    if status == "succeeded":
        return {"value": 1.0, "nodes_done": len(payload), "nodes_total": len(payload)}
    if not isinstance(task.progress, dict) or status == "queued":
        return None
    return progress_snapshot(payload, task.progress)


def progress_snapshot(payload: dict[str, Any], progress: dict[str, Any]) -> dict[str, Any] | None:
    """v2's progress of a running job from comfyfleet's (``node``, ``class_type``, ``value``, ``max``)."""
    nodes_total = len(payload)
    node = progress.get("node")
    node = str(node) if node is not None else None
    step, steps = _number(progress.get("value")), _number(progress.get("max"))
    if step is None or steps is None or steps <= 0:
        step = steps = None
    done = len(ancestors(payload, node)) if node is not None else 0
    within = min(step / steps, 1.0) if step is not None and steps is not None else 0.0
    fraction = (done + within) / nodes_total if nodes_total else 0.0
    class_type = progress.get("class_type")
    class_type = class_type if isinstance(class_type, str) else None
    message = class_type
    if class_type is not None and step is not None and steps is not None:
        message = f"{class_type} {int(step)}/{int(steps)}"
    return {
        "value": round(min(max(fraction, 0.0), 1.0), 4),
        "nodes_done": done,
        "nodes_total": nodes_total,
        "current_node": node,
        "current_node_class": class_type,
        "step": int(step) if step is not None else None,
        "steps": int(steps) if steps is not None else None,
        "message": message,
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ancestors(graph: Any, node_id: str) -> set[str]:
    """Every node ``node_id`` depends on through links."""
    sources: dict[str, set[str]] = {}
    try:
        for link in iter_links(graph):
            sources.setdefault(link.node_id, set()).add(link.source_id)
    except NotAGraph:
        return set()
    found: set[str] = set()
    waiting = deque([node_id])
    while waiting:
        for source in sources.get(waiting.popleft(), ()):
            if source not in found and source != node_id:
                found.add(source)
                waiting.append(source)
    return found


def error_json(task: Task) -> dict[str, Any] | None:
    if task.status is not TaskStatus.FAILED:
        return None
    details = task.error_details if isinstance(task.error_details, dict) else {}
    kind = task.error_kind or "failed"
    node_id = details.get("node_id")
    class_type = details.get("node_type")
    return {
        "code": _ERROR_CODES.get(kind, kind),
        "message": task.error or "the job failed",
        "node_id": str(node_id) if node_id is not None else None,
        "class_type": class_type if isinstance(class_type, str) else None,
        "traceback": None,  # tracebacks name the worker's files; comfyfleet keeps them off the wire
    }


def output_type(kind: Any, content_type: str) -> str:
    """v2's kind of an output: from ComfyUI's list name, else from its content type."""
    if isinstance(kind, str) and kind in _OUTPUT_KINDS:
        return _OUTPUT_KINDS[kind]
    major = content_type.split("/", 1)[0]
    return {"image": "image", "video": "video", "audio": "audio", "text": "text"}.get(major, "file")
