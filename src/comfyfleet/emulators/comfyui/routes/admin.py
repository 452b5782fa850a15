"""``/emulator/*``: counters, faults, restarts and crashes for tests. Real ComfyUI has no such routes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from comfyfleet.emulators.comfyui.options import OptionsError
from comfyfleet.emulators.comfyui.routes.common import Route, json_body

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer


class AdminRoutes:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        return [
            ("GET", "/emulator/stats", self.stats),
            ("POST", "/emulator/faults", self.faults),
            ("POST", "/emulator/restart", self.restart),
            ("POST", "/emulator/crash", self.crash),
            ("POST", "/emulator/disconnect", self.disconnect),
        ]

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.stats_snapshot())

    async def faults(self, request: web.Request) -> web.Response:
        try:
            changes = await json_body(request)
            if not isinstance(changes, dict):
                raise OptionsError("the body must be a JSON object of option names to values")
            self.server.options.update(changes)
        except ValueError as exc:  # OptionsError and bad JSON alike
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.server.options.public())

    async def restart(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text() or "{}")
            down_s = float(body.get("down_s", 0.0))
        except (ValueError, AttributeError, TypeError):
            return web.json_response({"error": 'body must be {"down_s": seconds}'}, status=400)
        await self.server.restart_later(down_s)  # before answering: any later request sees the empty server
        return web.json_response({"restarted": True, "down_s": down_s})

    async def crash(self, request: web.Request) -> web.Response:
        self.server.spawn(self.server.crash(), "emulator-crash")
        return web.json_response({"crashing": True})

    async def disconnect(self, request: web.Request) -> web.Response:
        return web.json_response({"disconnected": await self.server.disconnect_sockets()})
