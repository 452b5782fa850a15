"""The three requests every ComfyUI client makes once per prompt, ``POST /prompt``, ``GET /history/{prompt_id}``
and ``GET /view`` (each also under ``/api``), answered without FastAPI's per-request machinery (the dependency
solver, parameter validation, the exit stacks), which cost as much CPU as the work they ask for.

:class:`PlainRequests` is a router middleware (``app.router.middleware_stack``), inside the application's
exception handlers. It answers a request only when nothing about it needs FastAPI: a caller whose key is in
its headers (a ``?token=`` goes to the router, which reads it) and a query holding exactly what the route reads
(none for ``/prompt`` and ``/history/{id}``; ``filename``, ``subfolder``, ``type``, each at most once, for
``/view``). The answer comes from the route's own method, so it is the router's answer; anything else (no or a
bad key, other or repeated parameters, FastAPI's telemetry on) goes on to the router unchanged. A prompt's
body is read as the route reads it (any content type; the route's own parser), so once its headers are plain
a prompt is always answered here.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.gateway.routes.files import FileRoutes
from comfyfleet.gateway.routes.history import HistoryRoutes
from comfyfleet.gateway.routes.prompts import PromptRoutes
from comfyfleet.http.auth import KeyRing
from comfyfleet.http.plain import before_router, caller_of, read_body

_HISTORY_ENTRY = re.compile(r"(?:/api)?/history/([^/]+)")
_VIEW = frozenset({"/view", "/api/view"})
_PROMPT = frozenset({"/prompt", "/api/prompt"})
_VIEW_PARAMETERS = frozenset({"filename", "subfolder", "type"})


class PlainRequests:
    def __init__(
        self,
        app: ASGIApp,
        keyring: KeyRing,
        prompts: PromptRoutes,
        history: HistoryRoutes,
        files: FileRoutes,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.prompts = prompts
        self.history = history
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response | None = None
        if before_router(scope, "GET"):
            response = await self._read(scope)
        elif (
            before_router(scope, "POST")
            and scope["path"] in _PROMPT
            and not scope["query_string"]
            and (principal := caller_of(scope, self.keyring)) is not None
        ):
            body = await read_body(receive)
            if body is None:
                return  # the client went away before sending its prompt
            response = await self.prompts.queue(body, principal)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _read(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        entry = _HISTORY_ENTRY.fullmatch(path)
        if entry is None and path not in _VIEW:
            return None
        query = scope["query_string"]
        if entry is not None and query:
            return None
        principal = caller_of(scope, self.keyring)  # None: the router refuses it (or reads a ?token=)
        if principal is None:
            return None
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
