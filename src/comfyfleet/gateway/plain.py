"""The two reads every ComfyUI client makes once per prompt, ``GET /history/{prompt_id}`` and ``GET /view``
(each also under ``/api``), answered without FastAPI's per-request machinery (the dependency solver, parameter
validation, the exit stacks), which cost as much CPU as the reads themselves.

:class:`PlainReads` is a router middleware (``app.router.middleware_stack``), inside the application's
exception handlers. It answers a request only when nothing about it needs FastAPI: a caller whose key is in
its headers (a ``?token=`` goes to the router, which reads it) and a query holding exactly what the route reads
(none for ``/history/{id}``; ``filename``, ``subfolder``, ``type``, each at most once, for ``/view``). The
answer comes from the route's own method, so it is the router's answer; anything else (no or a bad key, other
or repeated parameters, FastAPI's telemetry on) goes on to the router unchanged.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.gateway.routes.files import FileRoutes
from comfyfleet.gateway.routes.history import HistoryRoutes
from comfyfleet.http.auth import KeyRing, principal_from
from comfyfleet.http.errors import Unauthorized

_HISTORY_ENTRY = re.compile(r"(?:/api)?/history/([^/]+)")
_VIEW = frozenset({"/view", "/api/view"})
_VIEW_PARAMETERS = frozenset({"filename", "subfolder", "type"})


class PlainReads:
    def __init__(self, app: ASGIApp, keyring: KeyRing, history: HistoryRoutes, files: FileRoutes) -> None:
        self.app = app
        self.keyring = keyring
        self.history = history
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("root_path")
            and "fastapi.telemetry" not in scope
        ):
            response = await self._answer(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        entry = _HISTORY_ENTRY.fullmatch(path)
        if entry is None and path not in _VIEW:
            return None
        query = scope["query_string"]
        if entry is not None and query:
            return None
        try:
            principal = principal_from(HTTPConnection(scope), self.keyring)
        except Unauthorized:
            return None  # the router refuses it in ComfyUI's shape (or reads a ?token=)
        if entry is not None:
            return await self.history.get_history_entry(entry[1], principal)
        parameters = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        names = [name for name, _ in parameters]
        if len(set(names)) != len(names) or not _VIEW_PARAMETERS.issuperset(names):
            return None
        given = dict(parameters)
        return await self.files.view(
            principal,
            filename=given.get("filename", ""),
            subfolder=given.get("subfolder", ""),
            type=given.get("type", "output"),
        )
