"""Tasks seen as ComfyUI prompts: history entries, queue items, output references, error bodies.

Pure functions over :class:`~comfyfleet.domain.Task`. A prompt's id in every gateway answer is the task's
id, its ``number`` is the task's ``seq``, and an output file is referenced as ComfyUI's
``{"filename", "subfolder", "type"}`` with ``subfolder`` = the task id, which is what the gateway's
``/view`` reads back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from comfyfleet.domain import Task, TaskStatus
from comfyfleet.domain.graph import GraphErrorType
from comfyfleet.tasks import Problem

METADATA_KEY = "comfyui"  # task.metadata["comfyui"]: client_id, extra_data of a gateway submission

# Output nodes of ComfyUI's core catalogue, for when no worker's object_info is at hand.
KNOWN_OUTPUT_NODES = frozenset(
    {
        "SaveImage",
        "PreviewImage",
        "SaveImageWebsocket",
        "SaveAnimatedWEBP",
        "SaveAnimatedPNG",
        "SaveLatent",
        "SaveText",
        "SaveVideo",
        "SaveWEBM",
        "SaveAudio",
        "SaveAudioMP3",
        "SaveAudioOpus",
        "PreviewAudio",
        "SaveGLB",
        "Preview3D",
        "PreviewAny",
    }
)

# extra_data keys ComfyUI keeps out of /queue and history.
SENSITIVE_EXTRA_DATA = frozenset({"api_key_comfy_org", "auth_token_comfy_org"})


def is_canonical_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def millis(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def gateway_meta(task: Task) -> dict[str, Any]:
    meta = (task.metadata or {}).get(METADATA_KEY)
    return meta if isinstance(meta, dict) else {}


def client_id_of(task: Task) -> str | None:
    client_id = gateway_meta(task).get("client_id")
    return client_id if isinstance(client_id, str) and client_id else None


def output_ref(task_id: str, output: Mapping[str, Any]) -> dict[str, Any]:
    return {"filename": str(output.get("filename", "")), "subfolder": task_id, "type": "output"}


def outputs_by_node(task: Task) -> dict[str, dict[str, list[Any]]]:
    """History's ``outputs``: node id → {"images": [refs], …, "text": [strings]}."""
    by_node: dict[str, dict[str, list[Any]]] = {}
    result = task.result or {}
    for output in result.get("outputs") or []:
        if isinstance(output, dict):
            node = by_node.setdefault(str(output.get("node_id", "")), {})
            node.setdefault(str(output.get("kind") or "images"), []).append(output_ref(task.id, output))
    texts = result.get("text")
    if isinstance(texts, dict):
        for node_id, values in texts.items():
            if isinstance(values, list):
                by_node.setdefault(str(node_id), {}).setdefault("text", []).extend(values)
    return by_node


def output_node_ids(task: Task, object_info: Mapping[str, Any] | None = None) -> list[str]:
    ids = []
    for node_id, node in task.payload.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        info = object_info.get(class_type) if object_info and isinstance(class_type, str) else None
        if (
            isinstance(info, Mapping) and info.get("output_node") is True
        ) or class_type in KNOWN_OUTPUT_NODES:
            ids.append(str(node_id))
    return ids


def public_extra_data(task: Task) -> dict[str, Any]:
    extra = gateway_meta(task).get("extra_data")
    data = (
        {key: value for key, value in extra.items() if key not in SENSITIVE_EXTRA_DATA}
        if isinstance(extra, dict)
        else {}
    )
    client_id = client_id_of(task)
    if client_id:
        data["client_id"] = client_id
    created = millis(task.created_at)
    if created is not None:
        data.setdefault("create_time", created)
    return data


def queue_item(task: Task, object_info: Mapping[str, Any] | None = None) -> list[Any]:
    """``[number, prompt_id, prompt, extra_data, outputs_to_execute]``, as ComfyUI's ``/queue`` lists it."""
    return [task.seq, task.id, task.payload, public_extra_data(task), output_node_ids(task, object_info)]


def execution_started_ms(task: Task) -> int | None:
    timings = (task.result or {}).get("timings")
    started = timings.get("execution_started_at") if isinstance(timings, dict) else None
    if isinstance(started, str):
        try:
            return millis(datetime.fromisoformat(started))
        except ValueError:
            pass
    return millis(task.started_at)


def error_message(task: Task) -> dict[str, Any]:
    """The data of ``execution_error`` for a failed task (sanitized: no tracebacks or server paths)."""
    details = task.error_details or {}
    node_id = details.get("node_id")
    if node_id is None and isinstance(details.get("node_errors"), dict) and details["node_errors"]:
        node_id = next(iter(details["node_errors"]))
    node = task.payload.get(str(node_id)) if node_id is not None else None
    return {
        "prompt_id": task.id,
        "node_id": None if node_id is None else str(node_id),
        "node_type": details.get("node_type") or (node.get("class_type") if isinstance(node, dict) else None),
        "executed": list(details.get("executed") or []),
        "exception_message": str(details.get("exception_message") or task.error or "execution failed"),
        "exception_type": str(details.get("exception_type") or task.error_kind or "Exception"),
        "traceback": [],
        "current_inputs": {},
        "current_outputs": [],
        "timestamp": millis(task.completed_at),
    }


def interrupted_message(task: Task) -> dict[str, Any]:
    progress = task.progress or {}
    node_id = progress.get("node")
    node = task.payload.get(str(node_id)) if node_id is not None else None
    return {
        "prompt_id": task.id,
        "node_id": None if node_id is None else str(node_id),
        "node_type": node.get("class_type") if isinstance(node, dict) else None,
        "executed": [],
        "timestamp": millis(task.completed_at),
    }


def enters_history(task: Task) -> bool:
    """ComfyUI keeps finished prompts in history, but never one deleted from the queue before it ran."""
    if task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
        return True
    return task.status is TaskStatus.CANCELLED and task.started_at is not None


def history_entry(task: Task, object_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    started = execution_started_ms(task)
    ended = millis(task.completed_at)
    messages: list[list[Any]] = [
        ["execution_start", {"prompt_id": task.id, "timestamp": started}],
        ["execution_cached", {"nodes": [], "prompt_id": task.id, "timestamp": started}],
    ]
    if task.status is TaskStatus.COMPLETED:
        messages.append(["execution_success", {"prompt_id": task.id, "timestamp": ended}])
    elif task.status is TaskStatus.CANCELLED:
        messages.append(["execution_interrupted", interrupted_message(task)])
    else:
        messages.append(["execution_error", error_message(task)])
    outputs = outputs_by_node(task)
    return {
        "prompt": queue_item(task, object_info),
        "outputs": outputs,
        "status": {
            "status_str": "success" if task.status is TaskStatus.COMPLETED else "error",
            "completed": task.status is TaskStatus.COMPLETED,
            "messages": messages,
        },
        "meta": {
            node_id: {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            for node_id in outputs
        },
    }


def prompt_error(
    kind: str,
    message: str,
    details: str = "",
    node_errors: Mapping[str, Any] | None = None,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """ComfyUI's 400 body: ``{"error": {type, message, details, extra_info}, "node_errors": {…}}``."""
    return {
        "error": {"type": kind, "message": message, "details": details, "extra_info": dict(extra_info or {})},
        "node_errors": dict(node_errors or {}),
    }


def structural_errors_body(graph: Mapping[str, Any], problems: Iterable[Problem]) -> dict[str, Any]:
    """The task service's structural graph problems in ComfyUI's error shape (when no worker can validate)."""
    problems = list(problems)
    for problem in problems:
        if problem.type in (GraphErrorType.MISSING_CLASS_TYPE, GraphErrorType.INVALID_CLASS_TYPE):
            node_id = problem.extra.get("node_id") or ""
            return prompt_error(
                "missing_node_type",
                f"Node '#{node_id}' has no class_type. The workflow may be corrupted or a custom node may be missing.",
                f"Node ID '#{node_id}'",
                extra_info={"node_id": node_id, "class_type": None, "node_title": node_id},
            )
    node_errors: dict[str, Any] = {}
    loose: list[str] = []
    for problem in problems:
        node_id = problem.extra.get("node_id")
        input_name = problem.extra.get("input_name")
        if node_id is None:
            loose.append(problem.message)
            continue
        node = graph.get(node_id)
        entry = node_errors.setdefault(
            node_id,
            {
                "errors": [],
                "dependent_outputs": [],
                "class_type": node.get("class_type") if isinstance(node, dict) else None,
            },
        )
        entry["errors"].append(
            {
                "type": problem.type,
                "message": problem.message,
                "details": input_name or "",
                "extra_info": {"input_name": input_name} if input_name else {},
            }
        )
    return prompt_error(
        "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(loose), node_errors
    )


def prune_to_targets(graph: Mapping[str, Any], targets: Iterable[str]) -> dict[str, Any]:
    """Only the nodes the target outputs depend on (ComfyUI's ``partial_execution_targets``)."""
    keep: set[str] = set()
    stack = [str(target) for target in targets if str(target) in graph]
    while stack:
        node_id = stack.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        node = graph.get(node_id)
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in (inputs or {}).values() if isinstance(inputs, dict) else ():
            if (
                isinstance(value, list)
                and len(value) == 2
                and isinstance(value[0], str)
                and value[0] in graph
            ):
                stack.append(value[0])
    return {node_id: node for node_id, node in graph.items() if node_id in keep}
