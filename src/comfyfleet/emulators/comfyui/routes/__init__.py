"""The emulator's HTTP application: upstream's route table, each route also under ``/api``, plus ``/emulator/*``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from comfyfleet.emulators.comfyui.hub import serve_socket
from comfyfleet.emulators.comfyui.routes.admin import AdminRoutes
from comfyfleet.emulators.comfyui.routes.common import Route, origin_only
from comfyfleet.emulators.comfyui.routes.files import FileRoutes
from comfyfleet.emulators.comfyui.routes.info import InfoRoutes
from comfyfleet.emulators.comfyui.routes.jobs import JobRoutes
from comfyfleet.emulators.comfyui.routes.prompts import PromptRoutes

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer


def make_app(server: EmulatorServer) -> web.Application:
    app = web.Application(client_max_size=server.options.max_upload_size, middlewares=[origin_only])

    async def websocket(request: web.Request) -> web.StreamResponse:
        return await serve_socket(request, server.state)

    routes: list[Route] = [
        ("GET", "/ws", websocket),
        *PromptRoutes(server).routes(),
        *JobRoutes(server).routes(),
        *FileRoutes(server).routes(),
        *InfoRoutes(server).routes(),
    ]
    for method, path, handler in routes:
        # Upstream registers every route again under /api; the jobs routes already carry the prefix, so
        # they also answer at /api/api/jobs while bare /jobs is a 404.
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    for method, path, handler in AdminRoutes(server).routes():
        app.router.add_route(method, path, handler)
    return app
