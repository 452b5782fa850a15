"""How the REST API words the task service's refusals: the one place they become statuses and error bodies.

A refused command answers ``{"error": <code>, "code": <status>, "message", "details"}``, like every other
failure of the API (``comfyfleet.http.errors``); a problem's location in the command becomes a ``loc`` in the
request body (``["body", "payload", "3", "seed"]``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from comfyfleet.http.errors import error_response
from comfyfleet.tasks import (
    IdempotencyConflict,
    Rejected,
    TaskCommandError,
    TaskNotFound,
    TaskStateConflict,
)

_STATUSES: tuple[tuple[type[TaskCommandError], int], ...] = (
    (Rejected, 422),
    (IdempotencyConflict, 422),
    (TaskNotFound, 404),
    (TaskStateConflict, 409),
)
# Refusals the API has always reported under the generic code of a request that fails validation.
_CODES = {"priority_out_of_range": "validation_error"}


def rest_error(exc: TaskCommandError) -> tuple[int, str, str, dict[str, Any] | None]:
    """``(status, error code, message, details)`` of a refused command."""
    status = next((status for kind, status in _STATUSES if isinstance(exc, kind)), 422)
    details: dict[str, Any] | None = None
    if isinstance(exc, IdempotencyConflict):
        details = {"task_id": exc.task_id} if exc.task_id else None
        message = exc.message.replace("the idempotency key", "Idempotency-Key", 1)
    else:
        message = exc.message
    if exc.problems:
        details = {
            "errors": [
                {"loc": _loc(problem.location), "message": problem.message, "type": problem.type}
                | dict(problem.extra)
                for problem in exc.problems
            ]
        }
    return status, _CODES.get(exc.code, exc.code), message, details


def _loc(location: tuple[str | int, ...]) -> list[str | int]:
    """Where a problem of the command sits in the request: the body's fields, or the header the idempotency
    key came in."""
    if location[:1] == ("idempotency",):
        return ["header", "Idempotency-Key", *location[1:]]
    return ["body", *location]


def _task_command_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskCommandError)
    return error_response(*rest_error(exc))


def install_error_handler(app: FastAPI) -> None:
    app.add_exception_handler(TaskCommandError, _task_command_error)
