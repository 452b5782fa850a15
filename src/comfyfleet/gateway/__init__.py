"""A ComfyUI-compatible front door: a program written for one ComfyUI server uses the whole fleet.

``POST /prompt`` queues a task (through the task service), ``GET /ws`` streams its frames in ComfyUI's order,
``/history`` and ``/view`` read its results, ``/queue``, ``/interrupt``, ``/upload/image``, ``/object_info``
and ``/system_stats`` behave as ComfyUI's do, each also under ``/api`` (ComfyUI registers every route twice).
"""

from __future__ import annotations

from fastapi import FastAPI

from comfyfleet.gateway.access import install_unauthorized_handler
from comfyfleet.gateway.plain import PlainRequests
from comfyfleet.gateway.routes import route_groups
from comfyfleet.gateway.service import Gateway
from comfyfleet.http.services import Services


def install_gateway(app: FastAPI, services: Services) -> Gateway:
    """Add the ComfyUI routes at the root and their ``/api`` aliases (documented once, at the root); return
    the gateway they share."""
    gateway = Gateway(services)
    install_unauthorized_handler(app)
    groups = route_groups(gateway)
    for group in groups:
        app.include_router(group.router)
    for group in groups:
        app.include_router(group.router, prefix="/api", include_in_schema=False)
    prompts, history, files, _ = groups
    app.router.middleware_stack = PlainRequests(
        app.router.middleware_stack, services.keyring, prompts, history, files
    )
    return gateway


__all__ = ["Gateway", "install_gateway"]
