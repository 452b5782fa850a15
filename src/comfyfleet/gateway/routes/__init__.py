"""The ComfyUI routes, one module per group: a :class:`~comfyfleet.gateway.routes.group.RouteGroup` each,
bound to the application's :class:`Gateway`."""

from __future__ import annotations

from fastapi import APIRouter

from comfyfleet.gateway.routes.files import FileRoutes
from comfyfleet.gateway.routes.history import HistoryRoutes
from comfyfleet.gateway.routes.prompts import PromptRoutes
from comfyfleet.gateway.routes.system import SystemRoutes
from comfyfleet.gateway.service import Gateway


def routers(gateway: Gateway) -> list[APIRouter]:
    return [group(gateway).router for group in (PromptRoutes, HistoryRoutes, FileRoutes, SystemRoutes)]
