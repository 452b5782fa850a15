"""Comfy API v2's error envelope, and the one place where this front door's failures become it.

Every failure under ``/api/v2`` answers ``{"error": {"code", "message", "details"}}`` with v2's codes:
``invalid_workflow`` (with per-node ``details.node_errors``), ``workflow_format_ui``, ``missing_asset`` and
``idempotency_key_reuse`` (422), ``hash_mismatch`` (409), ``blob_not_found`` and ``not_found`` (404),
``unauthorized`` (401), ``too_many_streams`` (429), ``asset_in_use`` and ``model_name_taken`` (409), ``upstream_error`` (500, a generic message; the cause
goes to the log). Requests v2 does not describe get ``invalid_request`` (400 for a query, header or body that
cannot be read; 422 for a body that can be read but is not valid).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from comfyfleet.assets import (
    AssetError,
    AssetInUse,
    AssetNotFound,
    AssetsUnavailable,
    BlobNotFound,
    HashMismatch,
    InvalidAsset,
    MissingAsset,
    ModelNameTaken,
)
from comfyfleet.http.errors import ApiError, describe_validation_errors, json_response, routed_methods
from comfyfleet.store import InvalidArgument, NotFound, StoreError
from comfyfleet.tasks import IdempotencyConflict, Rejected, TaskCommandError, TaskNotFound

logger = logging.getLogger(__name__)

UPSTREAM_MESSAGE = "an unexpected failure occurred while processing the request; try again shortly"


class V2Error(ApiError):
    """A failure the client is told about in v2's envelope (``error`` holds v2's code)."""

    @property
    def code(self) -> str:
        return self.error


def not_found(what: str) -> V2Error:
    # The same answer for "unknown" and "another tenant's": nothing tells one from the other.
    return V2Error(404, "not_found", f"no {what}")


def invalid_request(message: str, errors: Sequence[Mapping[str, Any]] = (), status: int = 422) -> V2Error:
    return V2Error(
        status, "invalid_request", message, {"errors": [dict(e) for e in errors]} if errors else None
    )


def envelope(code: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = dict(details)
    return to_json({"error": error})


def v2_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return json_response(envelope(code, message, details), status, headers)


def task_command_error(exc: TaskCommandError) -> V2Error:
    """The task service's refusal of a job command, in v2's words."""
    if isinstance(exc, IdempotencyConflict):
        return V2Error(
            422,
            "idempotency_key_reuse",
            "this Idempotency-Key was already used; keys are used once: poll or list your jobs to find the "
            "job it created, or use a new key",
        )
    if isinstance(exc, TaskNotFound):
        return not_found("such job")
    if isinstance(exc, Rejected) and exc.code == "invalid_graph":
        return V2Error(422, "invalid_workflow", exc.message, {"node_errors": node_errors(exc)})
    problems = [
        {"loc": list(problem.location), "message": problem.message, "type": problem.type}
        for problem in exc.problems
    ]
    return V2Error(422, "invalid_request", exc.message, {"reason": exc.code, "errors": problems})


def node_errors(exc: Rejected) -> dict[str, list[dict[str, Any]]]:
    """Per-node problems of a refused graph: ``{node_id: [{"field", "reason", "message"}]}`` (problems of the
    graph as a whole under ``""``)."""
    found: dict[str, list[dict[str, Any]]] = {}
    # A problem of the graph as a whole may still be one node's (ComfyUI names an unknown node class there).
    whole = (exc.comfyui_response or {}).get("error")
    extra = whole.get("extra_info") if isinstance(whole, dict) else None
    named = extra.get("node_id") if isinstance(extra, dict) else None
    for problem in exc.problems:
        node_id = problem.extra.get("node_id", named if problem.location == ("payload",) else None)
        field = problem.extra.get("input_name")
        found.setdefault(str(node_id) if node_id is not None else "", []).append(
            {"field": field, "reason": problem.type, "message": problem.message}
        )
    return found


_ASSET_STATUSES: tuple[tuple[type[AssetError], int], ...] = (
    (AssetNotFound, 404),
    (BlobNotFound, 404),
    (HashMismatch, 409),
    (ModelNameTaken, 409),
    (AssetInUse, 409),
    (MissingAsset, 422),
    (InvalidAsset, 422),
)


def asset_error(exc: AssetError) -> V2Error:
    """The asset service's refusal, in v2's words."""
    if isinstance(exc, AssetsUnavailable):
        logger.warning("apiv2_assets_unavailable error=%s", exc.message)
        return V2Error(500, "upstream_error", UPSTREAM_MESSAGE, headers={"Retry-After": "1"})
    if isinstance(exc, AssetNotFound):
        return not_found("such asset")
    status = next((status for kind, status in _ASSET_STATUSES if isinstance(exc, kind)), 422)
    details = {"missing_ids": exc.missing} if isinstance(exc, MissingAsset) else None
    return V2Error(status, exc.code, exc.message, details)


# -- handlers --------------------------------------------------------------------------------------------
_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def _v2_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, V2Error)
    return v2_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _api_error(_request: Request, exc: Exception) -> Response:
    # The shared edge's errors (401 from the API keys, mostly) under v2's codes.
    assert isinstance(exc, ApiError)
    code = _CODES.get(exc.status, "invalid_request" if exc.status < 500 else "upstream_error")
    return v2_response(exc.status, code, exc.message, None, exc.headers)


def _task_command(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskCommandError)
    return _v2_error(_request, task_command_error(exc))


def _asset_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AssetError)
    return _v2_error(_request, asset_error(exc))


def _store_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, NotFound):
        return v2_response(404, "not_found", "no such job")
    if isinstance(exc, InvalidArgument):
        return v2_response(400, "invalid_request", str(exc))
    logger.warning("apiv2_store_error path=%s error=%s", request.url.path, exc)
    return v2_response(500, "upstream_error", UPSTREAM_MESSAGE, headers={"Retry-After": "1"})


def _request_validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = describe_validation_errors(list(exc.errors()))
    first = errors[0] if errors else {"loc": [], "message": "invalid request"}
    where = ".".join(str(part) for part in first["loc"]) or "the request"
    in_body = bool(first["loc"]) and first["loc"][0] == "body"
    return v2_response(
        422 if in_body else 400, "invalid_request", f"{where}: {first['message']}", {"errors": errors}
    )


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else None
    if status < 400:
        return Response(status_code=status, headers=headers)
    if status == 404:
        return v2_response(404, "not_found", f"no route {request.url.path}", headers=headers)
    if status == 405:
        # Starlette names the methods of the first route that matched the path only; GET and POST /jobs are two.
        allowed = ", ".join(routed_methods(request))
        headers = {**(headers or {}), "Allow": allowed}
        return v2_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here (allowed: {allowed})",
            headers=headers,
        )
    code = _CODES.get(status, "invalid_request" if status < 500 else "upstream_error")
    message = str(exc.detail) if exc.detail else code.replace("_", " ")
    return v2_response(status, code, message, headers=headers)


def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler so the server still logs the traceback; the client sees no trace.
    logger.error("apiv2_unhandled_error method=%s path=%s error=%r", request.method, request.url.path, exc)
    return v2_response(500, "upstream_error", UPSTREAM_MESSAGE)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(V2Error, _v2_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TaskCommandError, _task_command)
    app.add_exception_handler(AssetError, _asset_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
