"""The gateway's refusals in ComfyUI's 400 shape, and the one place the task service's errors become them.

ComfyUI answers a refused ``POST /prompt`` with ``{"error": {type, message, details, extra_info},
"node_errors": {…}}``; so does the gateway, whether the request broke ComfyUI's wire format (checked in
``gateway/prompt.py``) or the task service refused the command (:func:`comfyui_rejection`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from comfyfleet.domain.graph import GraphErrorType
from comfyfleet.gateway import shapes
from comfyfleet.tasks import IdempotencyConflict, Problem, Rejected, TaskCommandError


class PromptRejected(Exception):
    """A gateway request refused: ``body`` is ComfyUI's 400 answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", {}).get("message", "invalid prompt"))
        self.body = body


# The task service's codes under the error types ComfyUI clients know, where the gateway had its own words.
_TYPES = {"priority_out_of_range": "invalid_priority"}
# Where the fields of a task command sit in a POST /prompt body.
_WIRE_FIELDS = {
    "payload": "prompt",
    "priority": "extra_data.comfyfleet.priority",
    "pool": "extra_data.comfyfleet.pool",
    "inputs": "prompt (uploaded files)",
    "workflow_id": "extra_data.extra_pnginfo.workflow.id",
    "idempotency": "prompt_id",
}


def comfyui_rejection(exc: TaskCommandError, graph: Mapping[str, Any]) -> PromptRejected:
    """The task service's refusal of a prompt (its graph: ``graph``), as ComfyUI would word it."""
    if isinstance(exc, IdempotencyConflict):
        return PromptRejected(
            shapes.prompt_error(
                "invalid_prompt_id", "prompt_id is already in use", "choose another prompt_id, or omit it"
            )
        )
    if isinstance(exc, Rejected) and exc.comfyui_response is not None:
        return PromptRejected(exc.comfyui_response)
    if exc.code == "invalid_graph":
        if exc.problems and exc.problems[0].type == GraphErrorType.TOO_MANY_NODES:
            return PromptRejected(shapes.prompt_error("prompt_too_large", exc.problems[0].message))
        return PromptRejected(shapes.structural_errors_body(graph, exc.problems))
    where = _where(exc.problems)
    message = exc.message
    if exc.code == "invalid_text" and exc.problems:
        message = f"{where} {exc.problems[0].message}"  # named as the request names it, not as the command
    return PromptRejected(shapes.prompt_error(_TYPES.get(exc.code, exc.code), message, where))


def _where(problems: tuple[Problem, ...]) -> str:
    """The first problem's place in the ``POST /prompt`` body (``prompt.3.inputs.text``)."""
    if not problems or not problems[0].location:
        return ""
    field, *rest = (str(part) for part in problems[0].location)
    if field == "metadata" and rest[:1] == [shapes.METADATA_KEY]:
        # The gateway keeps a prompt's client_id and extra_data under the task's metadata["comfyui"].
        field, rest = rest[1] if len(rest) > 1 else "extra_data", rest[2:]
    elif field not in ("payload", "metadata"):
        rest = []
    return ".".join([_WIRE_FIELDS.get(field, field), *rest])
