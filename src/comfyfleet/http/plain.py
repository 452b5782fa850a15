"""What the requests answered before the router share (``api.submit_route``, ``api.plain_downloads``,
``gateway.plain``): whether a request may be, its caller, and its body read straight from ASGI messages."""

from __future__ import annotations

from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope

from comfyfleet.http.auth import KeyRing, Principal, principal_from
from comfyfleet.http.errors import Unauthorized


def before_router(scope: Scope, method: str) -> bool:
    """Whether an HTTP request with ``method`` may be answered before the router: not under a mount (a
    ``root_path``), and FastAPI's own telemetry off (with it, the router names the route in the request's
    span, so every request goes through it)."""
    return (
        scope["type"] == "http"
        and scope["method"] == method
        and not scope.get("root_path")
        and "fastapi.telemetry" not in scope
    )


def caller_of(scope: Scope, keyring: KeyRing) -> Principal | None:
    """The request's caller from its headers, or None for a missing or bad key (the router refuses it in the
    route's own shape)."""
    try:
        return principal_from(HTTPConnection(scope), keyring)
    except Unauthorized:
        return None


async def read_body(receive: Receive, received: list[Message] | None = None) -> bytes | None:
    """The whole request body, or None when the client went away first. Every message read is appended to
    ``received`` (when given), so that another handler can be given the request as it came."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if received is not None:
            received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
