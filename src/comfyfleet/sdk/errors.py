"""The SDK's errors: one root, one subclass per decision a caller makes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyfleet.sdk.models import Task


class ComfyfleetError(Exception):
    """Root of every error the comfyfleet SDK raises."""


class ServerUnreachable(ComfyfleetError):
    """The server could not be reached (refused, no route, DNS, TLS, connection dropped): try again later
    or check the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the comfyfleet server at {url}: {reason}")
        self.url = url
        self.reason = reason


class InputFileError(ComfyfleetError):
    """A local file given as a task input cannot be read (missing, a directory, no permission): nothing was
    sent to the server."""

    def __init__(self, name: str, path: str, reason: str) -> None:
        super().__init__(f"cannot read the input file {path!r} for input {name!r}: {reason}")
        self.name = name
        self.path = path
        self.reason = reason


class WaitTimeout(ComfyfleetError, TimeoutError):
    """The task did not end within the time the caller was willing to wait (it keeps running)."""

    def __init__(self, task_id: str, seconds: float) -> None:
        super().__init__(f"task {task_id} did not finish within {seconds:g} s (it keeps running)")
        self.task_id = task_id
        self.seconds = seconds


class ApiError(ComfyfleetError):
    """The server answered with an error (``{"error", "code", "message", "details"}``)."""

    def __init__(self, status: int, error: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.error})"


class Unauthorized(ApiError):
    """401/403: the API key is missing, wrong, or may not do this."""


class NotFound(ApiError):
    """404: no such task, worker or output (or it belongs to another tenant)."""


class Conflict(ApiError):
    """409: the request is valid but the record's state forbids it (e.g. cancelling a finished task)."""


class InvalidRequest(ApiError):
    """400/413/415/422: the server refused what was sent. ``errors`` lists the problems it named."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        found = self.details.get("errors")
        return [entry for entry in found if isinstance(entry, dict)] if isinstance(found, list) else []


class InvalidWorkflow(InvalidRequest):
    """422 ``invalid_graph``: the workflow graph is malformed (missing class_type, a link to a missing node,
    a cycle…). Each entry of ``errors`` names the node and input at fault."""


class ServerError(ApiError):
    """5xx: the server or its store failed; retrying later may succeed."""


class TaskFailed(ComfyfleetError):
    """A task ended ``failed`` or ``cancelled`` (raised by :meth:`Task.raise_for_status`)."""

    def __init__(self, task: Task) -> None:
        kind = f" [{task.error_kind}]" if task.error_kind else ""
        super().__init__(f"task {task.id} {task.status}{kind}: {task.error or 'no reason given'}")
        self.task = task

    @property
    def node_errors(self) -> dict[str, Any]:
        """ComfyUI's ``node_errors`` when a worker rejected the workflow (node id → errors), else ``{}``."""
        return self.task.node_errors


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
}


def api_error(status: int, body: Any, fallback: str) -> ApiError:
    """The typed error for an error response (``body`` is its decoded JSON, or None)."""
    error, message, details = "http_error", fallback, None
    if isinstance(body, dict):
        error = str(body.get("error") or error)
        message = str(body.get("message") or message)
        raw_details = body.get("details")
        details = raw_details if isinstance(raw_details, dict) else None
    if status == 422 and error == "invalid_graph":
        return InvalidWorkflow(status, error, message, details)
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, error, message, details)
