"""``/object_info``, ``/system_stats``, ``/features`` and the WebSocket ``/ws``: the fleet seen as one ComfyUI."""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Any

from fastapi import WebSocket
from starlette.responses import Response

from comfyfleet.domain import Worker
from comfyfleet.gateway.access import PrincipalDep, gateway_principal
from comfyfleet.gateway.routes.group import RouteGroup, route
from comfyfleet.gateway.schemas import FeaturesOut, SystemStatsOut, answers
from comfyfleet.gateway.socket import ComfySocket
from comfyfleet.http.errors import ApiError, Unauthorized
from comfyfleet.http.responses import JSONBody

logger = logging.getLogger(__name__)


class SystemRoutes(RouteGroup):
    @route(
        "GET",
        "/object_info",
        "Node catalogue of the fleet (ComfyUI)",
        response_model=dict[str, dict[str, Any]],
        responses=answers(),
    )
    async def object_info(self, principal: PrincipalDep) -> Response:
        """Every node class some worker offers (merged over the live workers, cached)."""
        del principal
        info = await self.gateway.catalogue.object_info()
        if info is None:
            raise ApiError(
                503,
                "no_workers",
                "no worker has been up yet to describe its nodes; try again when one is",
                headers={"Retry-After": "5"},
            )
        return JSONBody(info)

    @route(
        "GET",
        "/object_info/{node_class}",
        "One node class (ComfyUI)",
        response_model=dict[str, dict[str, Any]],
        responses=answers(),
    )
    async def object_info_one(self, node_class: str, principal: PrincipalDep) -> Response:
        del principal
        info = await self.gateway.catalogue.object_info() or {}
        return JSONBody({node_class: info[node_class]} if node_class in info else {})

    @route(
        "GET",
        "/system_stats",
        "System and devices (ComfyUI)",
        response_model=SystemStatsOut,
        responses=answers(),
    )
    async def system_stats(self, principal: PrincipalDep) -> Response:
        """This server's system facts; `devices` lists every live worker's devices, named after the worker."""
        del principal
        stats = await self.gateway.catalogue.system_stats()
        first = stats[0][1].get("system", {}) if stats else {}
        return JSONBody({"system": _system(first, len(stats)), "devices": _devices(stats)})

    @route(
        "GET", "/features", "Server feature flags (ComfyUI)", response_model=FeaturesOut, responses=answers()
    )
    async def features(self, principal: PrincipalDep) -> Response:
        del principal
        limits = self.gateway.settings.limits
        return JSONBody({"supports_preview_metadata": False, "max_upload_size": limits.max_input_bytes})

    @route("WEBSOCKET", "/ws")
    async def websocket(self, websocket: WebSocket) -> None:
        """ComfyUI's WebSocket (`?clientId=X`): status frames, and the frames of X's prompts."""
        gateway = self.gateway
        try:
            principal = gateway_principal(websocket, gateway.services.keyring)
        except Unauthorized:
            await websocket.close(code=1008, reason="an API key is needed: ?token=<key> or Authorization")
            return
        client_id = websocket.query_params.get("clientId") or None
        await ComfySocket(websocket, gateway, principal.visible_tenant, client_id).serve()


def _devices(stats: list[tuple[Worker, dict[str, Any]]]) -> list[dict[str, Any]]:
    devices = []
    for worker, answer in stats:
        for device in answer.get("devices") or []:
            if isinstance(device, dict):
                devices.append(
                    {**device, "name": f"{worker.id}: {device.get('name', '')}", "worker_id": worker.id}
                )
    return devices


def _system(first: dict[str, Any], workers: int) -> dict[str, Any]:
    system = {
        "os": os.name,
        "ram_total": 0,
        "ram_free": 0,
        "comfyui_version": first.get("comfyui_version", "comfyfleet"),
        "python_version": sys.version,
        "pytorch_version": first.get("pytorch_version", ""),
        "embedded_python": False,
        "argv": ["comfyfleet"],
        "platform": platform.platform(),
        "workers": workers,
    }
    try:
        import psutil

        memory = psutil.virtual_memory()
        system["ram_total"], system["ram_free"] = memory.total, memory.available
    except Exception:  # best effort: the facts are informative only
        logger.debug("system_stats_memory_unavailable", exc_info=True)
    return system
