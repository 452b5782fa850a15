"""The application object every part of the HTTP edge is mounted on, and what it does for all of them:
the services, the JSON response class, the error handlers and the request body limit."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.http.errors import (
    ApiError,
    ErrorOut,
    InvalidInput,
    RequestTooLarge,
    error_body,
    install_error_handlers,
)
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.services import Services
from comfyfleet.tasks.checks import TEXT_PROBLEMS, shown, text_problem

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
            RequestGuardMiddleware,
            max_body_bytes=services.settings.limits.max_body_bytes,
            exempt_prefixes=self._own_limits,
        )

    def mount_front_door(self, path: str, app: ASGIApp) -> None:
        """Mount an application that answers everything under ``path`` itself: its own error shape and its
        own request size limits (Comfy API v2, whose uploads are larger than this application's limit)."""
        self.mount(path, app)
        self._own_limits.append(path.rstrip("/") + "/")

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, completed with what this application's handlers and middleware answer."""
        if self.openapi_schema is None:
            self.openapi_schema = _with_edge_answers(super().openapi())
        return self.openapi_schema


class RequestGuardMiddleware:
    """What every request to this application is checked for before a route sees it, in one pass:

    - text no store can keep (a NUL character) in a query parameter is refused with 422 ``invalid_text``
      naming the parameter, and in the path with 404 (nothing is named so), before a route hands it to the
      store (PostgreSQL would refuse it as if it were down). Bodies are the task service's business
      (``tasks.checks``); percent-decoding turns undecodable bytes into U+FFFD, so a lone surrogate cannot
      come in through a URL.
    - a body over ``max_body_bytes`` is refused with 413 before anything parses it. A declared
      ``Content-Length`` is checked up front (the HTTP server never delivers more than it declares). A
      chunked body has no declared size, so it is read here, up to the limit, and replayed to the
      application; one byte too many and the request is refused at once (the HTTP server then skips the
      rest of that body, so the connection stays usable).

    Mounted front doors named in ``exempt_prefixes`` answer in their own error shape and limit their own
    bodies: their requests pass untouched.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, exempt_prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope["path"]).startswith(tuple(self.exempt_prefixes)):
            await self.app(scope, receive, send)
            return
        error = _unstorable_text(scope)
        if error is not None:
            await _send_error(send, error)
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
        # No "Connection: close": closing with the client's unread body in our receive buffer makes the
        # kernel reset the connection, and the client may lose this answer. The HTTP server discards the
        # rest of the body (it knows where it ends) and keeps the connection.
        await _send_error(send, RequestTooLarge(self.max_body_bytes))


def _unstorable_text(scope: Scope) -> ApiError | None:
    if text_problem(scope["path"]) is not None:
        return ApiError(404, "not_found", f"no route {shown(scope['path'])[:200]}")
    if not scope["query_string"]:
        return None
    for name, value in QueryParams(scope["query_string"]).multi_items():
        kind = text_problem(name) or text_problem(value)
        if kind is not None:
            problem = TEXT_PROBLEMS[kind]
            errors = [{"loc": ["query", shown(name)], "message": problem, "type": kind}]
            return InvalidInput(f"query parameter {shown(name)!r} {problem}", errors, "invalid_text")
    return None


async def _send_error(send: Send, error: ApiError) -> None:
    body = error_body(error.status, error.error, error.message, error.details)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
_FASTAPI_VALIDATION_REF = "#/components/schemas/HTTPValidationError"
# Every route that reads a JSON body may answer these, whatever the route itself declares.
_BODY_ANSWERS = {
    "400": "The request body is not valid JSON",
    "413": "The request body is over the size limit",
    "415": "The request body is not sent as JSON",
}


def _with_edge_answers(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 in its own ``HTTPValidationError`` shape on every route with parameters;
    the error handlers answer it in the error shape (``ErrorOut``). And a route that reads a JSON body
    also answers 400 for a body that is not JSON, 415 for one sent as another media type, and 413
    (``RequestGuardMiddleware``) for one too large."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorOut", ErrorOut.model_json_schema())
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            for answer in answers.values():
                media = answer.get("content", {}).get("application/json", {})
                if media.get("schema", {}).get("$ref") == _FASTAPI_VALIDATION_REF:
                    media["schema"] = dict(_ERROR_REF)
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                for status, description in _BODY_ANSWERS.items():
                    answers.setdefault(
                        status,
                        {
                            "description": description,
                            "content": {"application/json": {"schema": dict(_ERROR_REF)}},
                        },
                    )
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return document
