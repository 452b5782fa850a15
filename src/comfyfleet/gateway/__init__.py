"""A ComfyUI-compatible front door: a program written for one ComfyUI server uses the whole fleet.

``POST /prompt`` queues a task, ``GET /ws`` streams its frames in ComfyUI's order, ``/history`` and
``/view`` read its results, ``/queue``, ``/interrupt``, ``/upload/image``, ``/object_info`` and
``/system_stats`` behave as ComfyUI's do, each also under ``/api`` (ComfyUI registers every route twice).
"""

from __future__ import annotations

from fastapi import FastAPI


def install_gateway(app: FastAPI) -> None:
    """Add the ComfyUI routes at the root and their ``/api`` aliases (documented once, at the root)."""
    from comfyfleet.gateway.routes import build_router

    app.include_router(build_router(include_in_schema=True))
    app.include_router(build_router(include_in_schema=False), prefix="/api")


__all__ = ["install_gateway"]
