"""Comfy API v2 (``/api/v2``): the third front door, so that programs written with Comfy's ``comfy-sdk`` for Comfy
Cloud run on the fleet unchanged (``COMFY_BASE_URL``).

A v2 job is a comfyfleet task, submitted, cancelled and checked by the task service like any other; assets are
kept by ``comfyfleet.assets``. ``install_apiv2(app)`` mounts the v2 application on the edge's application; its
mapping of tasks to jobs is in ``wire.py``, its error envelope in ``errors.py``.
"""

from __future__ import annotations

from comfyfleet.apiv2.app import PREFIX, create_v2_app
from comfyfleet.apiv2.base import V2App
from comfyfleet.http.app import ServiceApp


def install_apiv2(app: ServiceApp) -> V2App:
    """Mount Comfy API v2 under ``/api/v2`` on ``app``, with its own error envelope and size limits."""
    v2 = create_v2_app(app.services)
    app.mount_front_door(PREFIX, v2)
    return v2


__all__ = ["PREFIX", "V2App", "create_v2_app", "install_apiv2"]
