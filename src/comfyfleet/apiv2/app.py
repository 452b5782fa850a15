"""The ``/api/v2`` application: its routes, its error envelope, its size limits, ``/health``."""

from __future__ import annotations

from fastapi import APIRouter

from comfyfleet.apiv2 import events, files, jobs
from comfyfleet.apiv2.base import BodyLimit, V2App
from comfyfleet.apiv2.errors import install_error_handlers
from comfyfleet.assets import AssetService
from comfyfleet.http.app import __version__
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.services import Services

PREFIX = "/api/v2"

health = APIRouter()


@health.get("/health")
async def get_health() -> JSONBody:
    """Open (no API key): the process answers. Readiness of the store is ``/ready``."""
    return JSONBody({"status": "ok", "version": __version__})


def create_v2_app(services: Services) -> V2App:
    settings = services.settings
    assets = AssetService(services.store, services.outputs, model_folders=settings.apiv2.model_folders)
    app = V2App(
        services,
        assets,
        title="comfyfleet: Comfy API v2",
        version=__version__,
        default_response_class=JSONBody,
        # The contract is Comfy API v2's own published specification; see docs/comfy-api-v2.md.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # /jobs/ (a job id left empty) is no job; redirecting it to the list would answer another question.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit,
        upload_bytes=settings.apiv2.max_upload_bytes,
        other_bytes=settings.limits.max_body_bytes,
    )
    app.include_router(health)
    for router in (jobs.router, events.router, files.router):
        app.include_router(router)
    return app
