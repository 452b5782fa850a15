"""``GET /api/v1/tasks/{id}/outputs/{filename}`` answered without FastAPI's per-request machinery: every REST
client downloads its outputs once per task, and the dependency solver and parameter validation cost as much
CPU as the download of a small file.

:class:`PlainDownloads` is a router middleware (``app.router.middleware_stack``), inside the application's
exception handlers. It answers a download itself only when nothing about it needs FastAPI: no query string,
path parameters within the route's limits, a caller that authenticates and an output store. The answer (or
refusal: 404, 503) comes from the route's own function, so it is the router's; anything else goes on to the
router unchanged.
"""

from __future__ import annotations

import re

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.api.routes.outputs import MAX_FILENAME_LENGTH, download_output
from comfyfleet.api.routes.tasks import MAX_TASK_ID_LENGTH
from comfyfleet.http.deps import services_of
from comfyfleet.http.plain import before_router, caller_of


class PlainDownloads:
    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.pattern = re.compile(re.escape(prefix) + r"/tasks/([^/]+)/outputs/([^/]+)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            before_router(scope, "GET")
            and not scope["query_string"]
            and (download := self.pattern.fullmatch(scope["path"])) is not None
            and len(download[1]) <= MAX_TASK_ID_LENGTH
            and len(download[2]) <= MAX_FILENAME_LENGTH
        ):
            services = services_of(HTTPConnection(scope))
            principal = caller_of(scope, services.keyring)
            if principal is not None and services.outputs is not None:
                response = await download_output(
                    download[1], download[2], principal, services.store, services.outputs
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
