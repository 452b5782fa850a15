"""The web dashboard at ``/``: queue and worker overview, a live task list, a page per task with its
output images, and cancel and drain buttons. Server-rendered (Jinja2), live through the API's
server-sent events, no JavaScript build step."""

from __future__ import annotations

from fastapi import FastAPI

from comfyfleet.dashboard.routes import router


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)


__all__ = ["install_dashboard"]
