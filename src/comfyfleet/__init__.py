"""comfyfleet: self-hosted serverless ComfyUI.

The Python SDK is importable from here (``from comfyfleet import Client, AsyncClient``). It is loaded on
first use, so ``import comfyfleet`` stays cheap for the CLI and the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfyfleet.sdk import (
        ApiError,
        AsyncClient,
        Client,
        ComfyfleetError,
        InvalidWorkflow,
        NotFound,
        ServerUnreachable,
        Task,
        TaskEvent,
        TaskFailed,
        WaitTimeout,
    )

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ComfyfleetError",
    "InvalidWorkflow",
    "NotFound",
    "ServerUnreachable",
    "Task",
    "TaskEvent",
    "TaskFailed",
    "WaitTimeout",
]
_SDK_EXPORTS = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name in _SDK_EXPORTS:
        from comfyfleet import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'comfyfleet' has no attribute {name!r}")
