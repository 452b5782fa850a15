"""The FastAPI application factory.

``create_app(settings, store, **services)`` builds the app around an already-open store, so tests and
the runtime assemble it the same way. Services (dispatcher, fleet manager…) are put on ``app.state``
under their keyword names for the routes that need them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.api.auth import KeyRing, authenticate
from comfyfleet.api.errors import RequestTooLarge, error_body, install_error_handlers
from comfyfleet.api.eta import StartEstimator
from comfyfleet.api.routes import events, health, outputs, queue, tasks, workers, workflows
from comfyfleet.api.schemas import JSONBody
from comfyfleet.config import Settings
from comfyfleet.dashboard import install_dashboard
from comfyfleet.gateway import install_gateway
from comfyfleet.metrics import metrics_router
from comfyfleet.store import Store

API_V1_PREFIX = "/api/v1"

try:
    __version__ = version("comfyfleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Routers mounted under /api/v1, each behind API-key authentication. Add new /api/v1 routers here.
API_V1_ROUTERS: list[APIRouter] = [
    tasks.router,
    outputs.router,
    events.router,
    queue.router,
    workers.router,
    workflows.router,
]

DESCRIPTION = """\
Self-hosted serverless ComfyUI: submit ComfyUI workflows (API-format graphs) with a priority; comfyfleet
stores them durably, runs them on a fleet of ComfyUI workers and keeps their results.

Every error has the shape `{"error": "<code>", "code": <status>, "message": "<sentence>", "details": {...}}`.
When API keys are configured, `/api/v1` routes need `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings, store: Store, **services: Any) -> FastAPI:
    """The HTTP API over an open ``store``. ``services`` become ``app.state.<name>``."""
    app = FastAPI(
        title="comfyfleet",
        version=__version__,
        description=DESCRIPTION,
        default_response_class=JSONBody,
        openapi_tags=[
            {"name": "tasks", "description": "Submit, list, read and cancel workflow runs."},
            {"name": "queue", "description": "Queue depth and age."},
            {"name": "workflows", "description": "Check a workflow against the fleet before submitting it."},
            {"name": "health", "description": "Liveness and readiness probes."},
        ],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.keyring = KeyRing(settings.api_keys)
    app.state.start_estimator = StartEstimator(store, settings)
    for name, service in services.items():
        setattr(app.state, name, service)

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.limits.max_body_bytes)

    # /api/v1 first: routes are matched in order, and submissions are the hot path.
    for router in API_V1_ROUTERS:
        app.include_router(router, prefix=API_V1_PREFIX, dependencies=[Depends(authenticate)])
    app.include_router(health.router)
    app.include_router(metrics_router())
    install_gateway(app)  # ComfyUI's routes (/prompt, /ws, /history, /view…) at the root and under /api
    install_dashboard(app)  # the web dashboard at /
    return app


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413 before anything parses them.

    A declared ``Content-Length`` is checked up front (the HTTP server never delivers more than it
    declares). A chunked body has no declared size, so it is read here, up to the limit, and replayed
    to the application; one byte too many and the request is refused at once (the HTTP server then
    skips the rest of that body, so the connection stays usable).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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
