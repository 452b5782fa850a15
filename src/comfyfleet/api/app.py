"""The REST API's part of the application: the ``/api/v1`` routers behind API keys, ``/health`` and ``/ready``,
its OpenAPI description and how it words the task service's refusals."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from comfyfleet.api.errors import install_error_handler
from comfyfleet.api.plain_downloads import PlainDownloads
from comfyfleet.api.routes import events, health, models, outputs, queue, tasks, workers, workflows
from comfyfleet.api.submit_route import PlainSubmissions
from comfyfleet.http.deps import authenticate

API_V1_PREFIX = "/api/v1"

# Routers mounted under /api/v1, each behind API-key authentication. Add new /api/v1 routers here.
API_V1_ROUTERS: list[APIRouter] = [
    tasks.router,
    outputs.router,
    events.router,
    queue.router,
    workers.router,
    workflows.router,
    models.router,
]

DESCRIPTION = """\
Self-hosted serverless ComfyUI: submit ComfyUI workflows (API-format graphs) with a priority; comfyfleet
stores them durably, runs them on a fleet of ComfyUI workers and keeps their results.

Every error has the shape `{"error": "<code>", "code": <status>, "message": "<sentence>", "details": {...}}`.
When API keys are configured, `/api/v1` routes need `Authorization: Bearer <key>`.
"""

OPENAPI_TAGS: list[dict[str, Any]] = [
    {"name": "tasks", "description": "Submit, list, read and cancel workflow runs."},
    {"name": "queue", "description": "Queue depth and age."},
    {"name": "workflows", "description": "Check a workflow against the fleet before submitting it."},
    {
        "name": "models",
        "description": "Models on demand: the host's model cache, pool manifests and where each worker's copy "
        "stands; verified model files for remote workers.",
    },
    {"name": "health", "description": "Liveness and readiness probes."},
]


def install_api(app: FastAPI) -> None:
    """Mount the API on ``app``: ``/api/v1`` first (routes are matched in order, and submissions are the hot
    path), then the health probes."""
    install_error_handler(app)
    for router in API_V1_ROUTERS:
        app.include_router(router, prefix=API_V1_PREFIX, dependencies=[Depends(authenticate)])
    app.router.middleware_stack = PlainSubmissions(app.router.middleware_stack, f"{API_V1_PREFIX}/tasks")
    app.router.middleware_stack = PlainDownloads(app.router.middleware_stack, API_V1_PREFIX)
    # Its own check: an admin key or a worker's token (a remote worker's companion holds no API key).
    app.include_router(models.blob_router, prefix=API_V1_PREFIX)
    app.include_router(health.router)
