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
    return PromptRejected(
        shapes.prompt_error(_TYPES.get(exc.code, exc.code), exc.message, _where(exc.problems))
    )


def _where(problems: tuple[Problem, ...]) -> str:
    if not problems or not problems[0].location:
        return ""
    field = str(problems[0].location[0])
    return _WIRE_FIELDS.get(field, field)
