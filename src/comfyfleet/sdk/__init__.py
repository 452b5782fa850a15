"""The comfyfleet Python SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

from comfyfleet import Client

with Client("http://127.0.0.1:8080") as fleet:
    task = fleet.run(workflow, priority=5)
    fleet.download(task.raise_for_status(), "out/")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyfleet.sdk.async_client import AsyncClient
    from comfyfleet.sdk.client import Client
    from comfyfleet.sdk.errors import (
        ApiError,
        ComfyfleetError,
        Conflict,
        InputFileError,
        InvalidRequest,
        InvalidWorkflow,
        NotFound,
        ServerError,
        ServerUnreachable,
        TaskFailed,
        Unauthorized,
        WaitTimeout,
    )
    from comfyfleet.sdk.models import Output, Task, TaskEvent, TaskPage

# name -> module. Loaded on first use: the CLI imports comfyfleet.sdk.commands without paying for httpx.
_EXPORTS = {
    "AsyncClient": "async_client",
    "Client": "client",
    "ApiError": "errors",
    "ComfyfleetError": "errors",
    "Conflict": "errors",
    "InputFileError": "errors",
    "InvalidRequest": "errors",
    "InvalidWorkflow": "errors",
    "NotFound": "errors",
    "ServerError": "errors",
    "ServerUnreachable": "errors",
    "TaskFailed": "errors",
    "Unauthorized": "errors",
    "WaitTimeout": "errors",
    "Output": "models",
    "Task": "models",
    "TaskEvent": "models",
    "TaskPage": "models",
}

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ComfyfleetError",
    "Conflict",
    "InputFileError",
    "InvalidRequest",
    "InvalidWorkflow",
    "NotFound",
    "Output",
    "ServerError",
    "ServerUnreachable",
    "Task",
    "TaskEvent",
    "TaskFailed",
    "TaskPage",
    "Unauthorized",
    "WaitTimeout",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'comfyfleet.sdk' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"comfyfleet.sdk.{module}"), name)
