"""The error shape of the HTTP edge, and the one place where exceptions become HTTP statuses.

Every failure — ours, the store's, FastAPI's request validation, Starlette's 404/405 — answers with the
same JSON shape::

    {"error": "<snake_case_code>", "code": <http status>, "message": "<sentence>", "details": {...}}

Routes raise :class:`ApiError` (or let a store error through); nothing here depends on a backend. The task
service's refusals are mapped by each front door to its own shape (the REST API's in ``api/errors.py``,
ComfyUI's in ``gateway/errors.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from comfyfleet.store import (
    Conflict,
    InvalidArgument,
    NotFound,
    StaleLease,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)


class ErrorOut(BaseModel):
    """The error shape, as the OpenAPI document describes it."""

    error: str = Field(description="A stable snake_case code, e.g. invalid_graph, not_found, unauthorized.")
    code: int = Field(description="The HTTP status.")
    message: str = Field(description="What went wrong, in a sentence.")
    details: dict[str, Any] | None = None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the error shape for these statuses."""
    return {status: {"model": ErrorOut} for status in statuses}


class ApiError(Exception):
    """Root of the API's errors: a failure the client is told about in the error shape."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = dict(details) if details else None
        self.headers = dict(headers) if headers else None


class Unauthorized(ApiError):
    def __init__(self, error: str, message: str) -> None:
        # RFC 6750: tell the client which scheme to use.
        super().__init__(401, error, message, headers={"WWW-Authenticate": 'Bearer realm="comfyfleet"'})


class RequestTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            "request_too_large",
            f"the request body is larger than the limit of {limit} bytes",
            details={"max_body_bytes": limit},
        )


class InvalidInput(ApiError):
    """422 with pydantic-like ``details.errors`` entries (``loc``, ``message``, ``type``)."""

    def __init__(
        self, message: str, errors: Sequence[Mapping[str, Any]], error: str = "validation_error"
    ) -> None:
        super().__init__(422, error, message, details={"errors": [dict(entry) for entry in errors]})


def error_body(status: int, error: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"error": error, "code": status, "message": message}
    if details:
        body["details"] = details
    return to_json(body)


def json_response(body: bytes, status: int, headers: Mapping[str, str] | None = None) -> Response:
    """An error body already encoded, as a response (every front door's error shape goes out through here)."""
    return Response(
        body, status_code=status, media_type="application/json", headers=dict(headers) if headers else None
    )


def error_response(
    status: int,
    error: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return json_response(error_body(status, error, message, details), status, headers)


# Store error → (status, code, message used when the store's own message is not for clients).
_STORE_ERRORS: tuple[tuple[type[StoreError], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (InvalidArgument, 422, "invalid_argument"),
    (Conflict, 409, "conflict"),
    (StaleLease, 409, "stale_attempt"),
    (StoreUnavailable, 503, "store_unavailable"),
    (StoreClosed, 503, "store_unavailable"),
)


def _store_error(request: Request, exc: Exception) -> Response:
    for kind, status, code in _STORE_ERRORS:
        if isinstance(exc, kind):
            if status == 503:
                logger.warning("store_unavailable path=%s error=%s", request.url.path, exc)
                # Tell well-behaved clients when to try again instead of hammering a recovering database.
                return error_response(
                    status,
                    code,
                    "the task store is unavailable; try again shortly",
                    headers={"Retry-After": "1"},
                )
            return error_response(status, code, str(exc) or HTTPStatus(status).phrase)
    logger.error("store_error path=%s error=%r", request.url.path, exc)
    return error_response(
        503, "store_error", "the task store failed to answer; try again shortly", headers={"Retry-After": "1"}
    )


def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.message, exc.details, exc.headers)


def _is_json_request(request: Request) -> bool:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return False  # FastAPI's strict content type: a body without one is not parsed as JSON
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def describe_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors without ``input``/``ctx``: they can echo a huge body or hold exception objects."""
    described = []
    for entry in errors:
        described.append(
            {
                "loc": [part if isinstance(part, int) else str(part) for part in entry.get("loc", ())],
                "message": str(entry.get("msg", "invalid value")),
                "type": str(entry.get("type", "value_error")),
            }
        )
    return described


def _where(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        origin, rest = parts[0], parts[1:]
        return f"{origin} field {'.'.join(rest)!r}" if rest else f"the request {origin}"
    return ".".join(parts) or "the request"


def _request_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    errors = describe_validation_errors(raw)
    if any(entry["type"] == "json_invalid" for entry in errors):
        detail = next(
            (entry.get("ctx", {}).get("error") for entry in raw if entry.get("type") == "json_invalid"), None
        )
        where = next(
            (
                entry["loc"][1]
                for entry in errors
                if entry["type"] == "json_invalid" and len(entry["loc"]) > 1
            ),
            None,
        )
        message = "the request body is not valid JSON"
        if detail:
            message += f": {detail}" + (f" at character {where}" if isinstance(where, int) else "")
        return error_response(400, "invalid_json", message)
    body_shape_error = any(
        entry["loc"] == ["body"] and entry["type"] in ("model_attributes_type", "dict_type", "model_type")
        for entry in errors
    )
    if body_shape_error and not _is_json_request(request):
        return error_response(
            415,
            "unsupported_media_type",
            "send the request body as JSON with Content-Type: application/json",
            details={"content_type": request.headers.get("content-type")},
        )
    if body_shape_error:
        return error_response(
            422, "validation_error", "the request body must be a JSON object", details={"errors": errors}
        )
    first = errors[0] if errors else {"loc": [], "message": "invalid request"}
    message = f"{_where(first['loc'])}: {first['message']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "validation_error", message, details={"errors": errors})


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    headers = dict(exc.headers) if exc.headers else None
    if status == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer when the body is not even text (e.g. not UTF-8), or nests deeper than Python's
        # JSON reader recurses: still a JSON problem to the client.
        if isinstance(exc.__cause__, RecursionError):
            return error_response(400, "invalid_json", "the request body is nested too deeply to be read")
        return error_response(
            400, "invalid_json", "the request body is not valid JSON (it must be UTF-8 encoded JSON)"
        )
    if status == 404 and exc.detail == "Not Found":
        message = f"no route {request.url.path}"
    elif status == 405:
        allowed = _allowed_methods(request)
        headers = {**(headers or {}), "Allow": allowed} if allowed else headers
        message = f"{request.method} is not allowed on {request.url.path}" + (
            f" (allowed: {allowed})" if allowed else ""
        )
    else:
        message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
    if status < 400 or status in (204, 304):
        return Response(status_code=status, headers=headers)
    return error_response(status, code, message, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def routed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers at the request's path."""
    # Starlette names only the first route that matched the path (GET and POST /tasks are two routes).
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    ]


def _allowed_methods(request: Request) -> str:
    """The methods of the resource at the request's path, for the ``Allow`` header of a 405."""
    routed = routed_methods(request)
    documented = _documented_methods(request.app, request.url.path)
    return ", ".join(method for method in routed if documented is None or method in documented)


def _documented_methods(app: FastAPI, path: str) -> set[str] | None:
    """The methods the OpenAPI document gives the most specific of its paths matching ``path`` (None when
    none does). A fixed path is a resource of its own: ``DELETE /workers/{worker_id}`` would take
    ``/workers/metrics`` as a worker's id, but DELETE is not a method of the metrics."""
    candidates: list[tuple[int, set[str]]] = []
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            candidates.append((template.count("{"), {method.upper() for method in operations}))
    if not candidates:
        return None
    fewest = min(parameters for parameters, _ in candidates)
    return set().union(*(methods for parameters, methods in candidates if parameters == fewest))


def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler so the server still logs the traceback; the client sees no trace.
    logger.error("unhandled_error method=%s path=%s error=%r", request.method, request.url.path, exc)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
