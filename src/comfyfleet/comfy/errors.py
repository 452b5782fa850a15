"""Errors of the ComfyUI client: one root, one subclass per decision a caller must make."""

from __future__ import annotations

from typing import Any


class ComfyError(Exception):
    """Root of every error raised by ``comfyfleet.comfy``."""


class ClientStateError(ComfyError):
    """The client was used before ``async with`` opened it, or after it was closed."""


class WorkerUnreachable(ComfyError):
    """The server could not be reached (connection refused or reset, DNS, socket closed mid-request).

    Retry elsewhere or probe the worker; nothing is known about work in flight on it."""


class ComfyTimeout(ComfyError):
    """The server accepted the connection but did not answer in time.

    For a submit this means *unknown*: the prompt may or may not be queued. Because ``prompt_id`` is
    chosen by the caller, ask ``job(prompt_id)`` before submitting again."""


class PromptLost(ComfyError):
    """The server no longer knows the prompt (restarted, or the prompt was deleted): it will never finish there."""

    def __init__(self, prompt_id: str, reason: str) -> None:
        super().__init__(f"prompt {prompt_id} lost: {reason}")
        self.prompt_id = prompt_id
        self.reason = reason


class WorkflowRejected(ComfyError):
    """ComfyUI refused the graph (HTTP 400). Not retryable: the same graph fails everywhere.

    ``error`` and ``node_errors`` are ComfyUI's own dicts, unchanged."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        message = str(error.get("message") or error.get("type") or "workflow rejected")
        details = error.get("details")
        super().__init__(f"{message}: {details}" if details else message)
        self.error = error
        self.node_errors = node_errors

    @property
    def type(self) -> str:
        return str(self.error.get("type", ""))


class OutputNotFound(ComfyError):
    """``/view`` answered 404: the file is not on the worker."""

    def __init__(self, filename: str, subfolder: str, kind: str) -> None:
        super().__init__(f"file not found on worker: {kind}/{subfolder + '/' if subfolder else ''}{filename}")
        self.filename = filename
        self.subfolder = subfolder
        self.kind = kind


class UnexpectedResponse(ComfyError):
    """The server answered with a status or body this client does not expect (e.g. a 500)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {body[:200]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


class MalformedPrompt(ComfyError, ValueError):
    """The graph is not even shaped like an API-format prompt (not a dict of node dicts).

    Real ComfyUI answers such a body with a bare 500; comfyfleet callers should answer 400."""
