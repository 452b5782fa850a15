"""The application object every part of the HTTP edge is mounted on, and what it does for all of them:
the services, the JSON response class, the error handlers and the request body limit."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.http.errors import RequestTooLarge, error_body, install_error_handlers
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.services import Services

try:
    __version__ = version("comfyfleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


class ServiceApp(FastAPI):
    """FastAPI with the :class:`Services` its routes are given (through ``http.deps``)."""

    def __init__(self, services: Services, **options: Any) -> None:
        super().__init__(version=__version__, default_response_class=JSONBody, **options)
        self.services = services
        install_error_handlers(self)
        self._own_limits: list[str] = []
        self.add_middleware(
            BodyLimitMiddleware,
            max_body_bytes=services.settings.limits.max_body_bytes,
            exempt_prefixes=self._own_limits,
        )

    def mount_front_door(self, path: str, app: ASGIApp) -> None:
        """Mount an application that answers everything under ``path`` itself: its own error shape and its
        own request size limits (Comfy API v2, whose uploads are larger than this application's limit)."""
        self.mount(path, app)
        self._own_limits.append(path.rstrip("/") + "/")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413 before anything parses them.

    A declared ``Content-Length`` is checked up front (the HTTP server never delivers more than it
    declares). A chunked body has no declared size, so it is read here, up to the limit, and replayed
    to the application; one byte too many and the request is refused at once (the HTTP server then
    skips the rest of that body, so the connection stays usable).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, exempt_prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.exempt_prefixes = exempt_prefixes  # mounted front doors that limit their own bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(tuple(self.exempt_prefixes)):
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None:
            if declared > self.max_body_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        await self._read_chunked(scope, receive, send)

    async def _read_chunked(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client went away; let the app see that
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [
            first
            if first is not None
            else {"type": "http.request", "body": b"".join(parts), "more_body": False}
        ]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        error = RequestTooLarge(self.max_body_bytes)
        body = error_body(error.status, error.error, error.message, error.details)
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # No "Connection: close": closing with the client's unread body in our receive buffer makes
                    # the kernel reset the connection, and the client may lose this answer. The HTTP server
                    # discards the rest of the body (it knows where it ends) and keeps the connection.
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
