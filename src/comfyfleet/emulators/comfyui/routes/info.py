"""Read-only descriptions of the server: ``object_info``, ``system_stats``, ``features``, model lists."""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

from aiohttp import web

from comfyfleet.emulators.comfyui.hub import FEATURES
from comfyfleet.emulators.comfyui.nodes import NODES_BY_NAME
from comfyfleet.emulators.comfyui.routes.common import Route

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer

COMFYUI_VERSION = "0.33.0"


class InfoRoutes:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        return [
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info_one),
            ("GET", "/system_stats", self.get_system_stats),
            ("GET", "/features", self.get_features),
            ("GET", "/models", self.get_models),
            ("GET", "/models/{folder}", self.get_models_folder),
            ("GET", "/embeddings", self.get_empty_list),
            ("GET", "/extensions", self.get_empty_list),
        ]

    async def get_object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.catalogue.object_info())

    async def get_object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        spec = NODES_BY_NAME.get(name)
        return web.json_response({name: self.server.catalogue.node_info(spec)} if spec else {})

    async def get_system_stats(self, request: web.Request) -> web.Response:
        import psutil

        memory = psutil.virtual_memory()
        vram = 24 * 1024**3
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": memory.total,
                    "ram_free": memory.available,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": "1.28.7",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": sys.version,
                    "pytorch_version": "emulated",
                    "embedded_python": False,
                    "argv": ["main.py", "--emulated", "--port", str(self.server.port)],
                },
                "devices": [
                    {
                        "name": f"cuda:0 Emulated GPU ({platform.machine()})",
                        "type": "cuda",
                        "index": 0,
                        "vram_total": vram,
                        "vram_free": vram - len(self.server.state.loaded_models) * 4 * 1024**3,
                        "torch_vram_total": vram,
                        "torch_vram_free": vram,
                    }
                ],
            }
        )

    async def get_features(self, request: web.Request) -> web.Response:
        return web.json_response({**FEATURES, "max_upload_size": self.server.options.max_upload_size})

    async def get_models(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.catalogue.model_folder_names())

    async def get_models_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self.server.catalogue.model_folder_names():
            return web.Response(status=404)
        return web.json_response(self.server.catalogue.model_files(folder))

    async def get_empty_list(self, request: web.Request) -> web.Response:
        return web.json_response([])
