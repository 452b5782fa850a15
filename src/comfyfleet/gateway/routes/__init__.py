"""The ComfyUI routes, one module per group: a :class:`~comfyfleet.gateway.routes.group.RouteGroup` each,
bound to the application's :class:`Gateway`."""

from __future__ import annotations

from comfyfleet.gateway.routes.files import FileRoutes
from comfyfleet.gateway.routes.history import HistoryRoutes
from comfyfleet.gateway.routes.prompts import PromptRoutes
from comfyfleet.gateway.routes.system import SystemRoutes
from comfyfleet.gateway.service import Gateway


def route_groups(gateway: Gateway) -> tuple[PromptRoutes, HistoryRoutes, FileRoutes, SystemRoutes]:
    return PromptRoutes(gateway), HistoryRoutes(gateway), FileRoutes(gateway), SystemRoutes(gateway)
