"""What the gateway's routes answer, as the OpenAPI document describes them.

The routes build plain dicts in ComfyUI's shapes (``gateway/shapes.py``); these models describe them for
``/openapi.json``, with the statuses each route can answer (:func:`answers`). ComfyUI's own objects (a graph,
a node class, a device) are described as open objects: their fields are ComfyUI's, not ours.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from comfyfleet.http.errors import ErrorOut


class ComfyErrorDetail(BaseModel):
    type: str = Field(
        description="ComfyUI's error type, e.g. prompt_outputs_failed_validation, unauthorized."
    )
    message: str
    details: str
    extra_info: dict[str, Any]


class ComfyErrorOut(BaseModel):
    """ComfyUI's error shape, which its clients know how to show."""

    error: ComfyErrorDetail
    node_errors: dict[str, Any] = Field(description="Per node id: its errors (a refused graph)")


class PromptQueuedOut(BaseModel):
    prompt_id: str = Field(description="The task's id")
    number: int = Field(description="The task's sequence number")
    node_errors: dict[str, Any]


class ExecInfo(BaseModel):
    queue_remaining: int


class QueueLengthOut(BaseModel):
    exec_info: ExecInfo


# [number, prompt_id, prompt, extra_data, outputs_to_execute]. Not a tuple: its JSON schema (prefixItems)
# is one that not every OpenAPI tool reads yet.
QueueItem = Annotated[list[Any], Field(min_length=5, max_length=5)]


class QueueOut(BaseModel):
    queue_running: list[QueueItem] = Field(
        description="`[number, prompt_id, prompt, extra_data, outputs_to_execute]` per running prompt"
    )
    queue_pending: list[QueueItem] = Field(description="Pending prompts, in the order they will run")


class HistoryStatus(BaseModel):
    status_str: str = Field(description="success or error")
    completed: bool
    messages: list[Annotated[list[Any], Field(min_length=2, max_length=2)]] = Field(
        description="`[event type, data]` of the prompt's execution"
    )


class HistoryEntryOut(BaseModel):
    prompt: QueueItem
    outputs: dict[str, dict[str, list[Any]]] = Field(description="Per output node: its files and texts")
    status: HistoryStatus
    meta: dict[str, dict[str, Any]]


class UploadedOut(BaseModel):
    name: str
    subfolder: str
    type: str


class SystemStatsOut(BaseModel):
    system: dict[str, Any]
    devices: list[dict[str, Any]] = Field(description="Every live worker's devices, named after the worker")


class FeaturesOut(BaseModel):
    supports_preview_metadata: bool
    max_upload_size: int


Responses = dict[int | str, dict[str, Any]]

# Statuses every gateway route may answer besides its own: without a valid key (when keys are configured),
# and when the task store does not answer.
_COMMON: Responses = {
    401: {"model": ComfyErrorOut, "description": "No valid API key (when keys are configured)"},
    503: {"model": ErrorOut, "description": "The task store or another service is unavailable"},
}
TOO_LARGE: Responses = {413: {"model": ErrorOut, "description": "The request body is over the size limit"}}
# ComfyUI answers these with an empty body; so does the gateway.
EMPTY_OK: Responses = {200: {"description": "Done (an empty body, as ComfyUI answers)"}}
EMPTY_NOT_FOUND: Responses = {404: {"description": "No such file (an empty body, as ComfyUI answers)"}}
FILE: Responses = {
    200: {
        "description": "The file, in its own content type (e.g. image/png)",
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
UPLOAD_REFUSED: Responses = {
    400: {
        "model": ComfyErrorOut,
        "description": "Not a multipart form (ComfyUI's error shape), or no usable file (a sentence)",
        "content": _TEXT,
    }
}
UPLOAD_TOO_LARGE: Responses = {
    413: {
        "model": ErrorOut,
        "description": "The request body is over the size limit, or the file over the upload limit (a sentence)",
        "content": _TEXT,
    }
}
MASK_ORIGINAL_MISSING: Responses = {
    404: {"description": "The image the mask is for does not exist (a sentence)", "content": _TEXT}
}


def refused(description: str) -> Responses:
    return {400: {"model": ComfyErrorOut, "description": description}}


def answers(*groups: Responses) -> Responses:
    """The ``responses`` of a gateway route: ``groups`` merged over the statuses every route may answer."""
    merged: Responses = dict(_COMMON)
    for group in groups:
        merged.update(group)
    return merged
