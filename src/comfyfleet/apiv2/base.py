"""The Comfy API v2 application object and what its routes are given: the services, the caller, the links.

v2 is a FastAPI application of its own, mounted under ``/api/v2`` by the composition root, so that everything
under that prefix answers in v2's error envelope (and with v2's size limits) while the rest of the edge keeps
comfyfleet's. It shares the edge's services, API keys and tenants.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.apiv2.errors import V2Error, envelope
from comfyfleet.apiv2.wire import Links
from comfyfleet.assets import AssetService
from comfyfleet.http.auth import Principal, principal_from
from comfyfleet.http.services import Services


class StreamSlots:
    """How many live event streams each tenant has open on this replica, against a cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def check(self, tenant: str) -> None:
        """429 ``too_many_streams`` when ``tenant`` has as many streams open as allowed."""
        if self._open[tenant] >= self.limit:
            raise V2Error(
                429,
                "too_many_streams",
                f"at most {self.limit} event streams may be open at once; close one, or poll GET /jobs/{{id}}",
                headers={"Retry-After": "5"},
            )

    @contextmanager
    def held(self, tenant: str) -> Iterator[None]:
        """One stream open for ``tenant`` while inside (taken where the stream runs, so that a stream that
        never started holds nothing)."""
        self._open[tenant] += 1
        try:
            yield
        finally:
            self._open[tenant] -= 1
            if self._open[tenant] <= 0:
                del self._open[tenant]


class V2App(FastAPI):
    """The ``/api/v2`` application: the edge's :class:`Services`, the asset service, the stream slots."""

    def __init__(self, services: Services, assets: AssetService, **options: Any) -> None:
        super().__init__(**options)
        self.services = services
        self.assets = assets
        self.streams = StreamSlots(services.settings.apiv2.max_event_streams)


def v2_app(connection: HTTPConnection) -> V2App:
    app = connection.app
    if not isinstance(app, V2App):
        raise TypeError(f"Comfy API v2's routes must be served by a V2App, not {type(app).__name__}")
    return app


async def get_app(connection: HTTPConnection) -> V2App:
    return v2_app(connection)


async def authenticate(connection: HTTPConnection) -> Principal:
    """The caller (``Authorization: Bearer <key>`` when keys are configured), as for ``/api/v1``."""
    return principal_from(connection, v2_app(connection).services.keyring)


async def get_links(connection: HTTPConnection) -> Links:
    url = connection.url
    return Links(origin=f"{url.scheme}://{url.netloc}", prefix=str(connection.scope.get("root_path", "")))


AppDep = Annotated[V2App, Depends(get_app)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
LinksDep = Annotated[Links, Depends(get_links)]


class BodyLimit:
    """Refuse request bodies over the limit with 413 in v2's envelope: an asset upload may carry
    ``upload_bytes``, any other request ``other_bytes``. A declared ``Content-Length`` is checked up front; a
    body without one is counted as the route reads it, and refused the moment it passes the limit."""

    def __init__(self, app: ASGIApp, *, upload_bytes: int, other_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.other_bytes = other_bytes

    def _limit(self, scope: Scope) -> int:
        uploading = scope.get("method") == "POST" and str(scope.get("path", "")).rstrip("/").endswith(
            "/assets"
        )
        # Room for the multipart framing and the form's small fields around the file.
        return self.upload_bytes + 64 * 1024 if uploading else self.other_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(send, limit)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        error = too_large(limit)
        body = envelope(error.code, error.message, error.details)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def too_large(limit: int) -> V2Error:
    return V2Error(
        413, "payload_too_large", f"the request body is larger than {limit} bytes", {"max_bytes": limit}
    )
