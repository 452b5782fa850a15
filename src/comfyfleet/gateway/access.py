"""What every gateway route needs from a request: the caller (also from ``?token=``) and the JSON body
as ComfyUI's own clients send it. A caller without a valid key is refused in ComfyUI's error shape, which
ComfyUI clients know how to show."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection
from starlette.responses import Response

from comfyfleet.gateway import shapes
from comfyfleet.gateway.errors import PromptRejected
from comfyfleet.http.auth import KeyRing, Principal, principal_from
from comfyfleet.http.deps import ServicesDep
from comfyfleet.http.errors import Unauthorized
from comfyfleet.http.responses import JSONBody


def gateway_principal(connection: HTTPConnection, keyring: KeyRing) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` (or the dashboard's cookie) or, for clients that
    cannot set headers (browsers' WebSockets, ComfyUI scripts), ``?token=<key>``."""
    token = connection.query_params.get("token")
    if token and connection.headers.get("authorization") is None:
        return keyring.principal_for(f"Bearer {token}")
    return principal_from(connection, keyring)


class GatewayUnauthorized(Exception):
    """A gateway request without a valid key: answered 401 in ComfyUI's error shape."""

    def __init__(self, refusal: Unauthorized) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


async def _principal(connection: HTTPConnection, services: ServicesDep) -> Principal:
    try:
        return gateway_principal(connection, services.keyring)
    except Unauthorized as exc:
        raise GatewayUnauthorized(exc) from None


def _unauthorized(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayUnauthorized)
    refusal = exc.refusal
    body = shapes.prompt_error(
        refusal.error, refusal.message, "send Authorization: Bearer <key>, or ?token=<key>"
    )
    return JSONBody(body, status_code=refusal.status, headers=refusal.headers)


def install_unauthorized_handler(app: FastAPI) -> None:
    app.add_exception_handler(GatewayUnauthorized, _unauthorized)


PrincipalDep = Annotated[Principal, Depends(_principal)]


async def json_body(request: Request) -> Any:
    """The body as JSON, whatever its content type (see :func:`parse_json_body`)."""
    return parse_json_body(await request.body())


def parse_json_body(raw: bytes) -> Any:
    """A body as JSON, whatever its content type: ComfyUI's own clients often post JSON without a JSON
    content type (urllib's default is a form). None for an empty body; ``PromptRejected`` for one that is
    not JSON."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PromptRejected(
            shapes.prompt_error("invalid_json", f"The request body is not valid JSON: {exc}", "")
        ) from exc
    except RecursionError as exc:  # Python's JSON reader recurses once per level of nesting
        raise PromptRejected(
            shapes.prompt_error("invalid_json", "The request body is nested too deeply to be read", "")
        ) from exc


def rejected(exc: PromptRejected) -> Response:
    return JSONBody(exc.body, status_code=400)
