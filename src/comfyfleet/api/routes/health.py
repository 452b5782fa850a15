"""``/health`` (the process answers) and ``/ready`` (the store answers and is migrated). No API key needed."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.responses import Response

from comfyfleet.api.schemas import HealthOut, ReadyOut, error_responses
from comfyfleet.http.deps import StoreDep
from comfyfleet.http.errors import error_response
from comfyfleet.http.responses import JSONBody
from comfyfleet.store import StoreError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut, summary="Liveness")
async def health() -> Response:
    """The process is alive and serving HTTP. Does not touch the store (use `/ready` for that)."""
    return JSONBody({"status": "ok"})


@router.get("/ready", response_model=ReadyOut, summary="Readiness", responses=error_responses(503))
async def ready(store: StoreDep) -> Response:
    """The store answers and every migration is applied; 503 `not_ready` otherwise."""
    try:
        is_ready = await store.is_ready()
    except StoreError as exc:
        logger.warning("store_not_ready error=%s", exc)
        is_ready = False
    if not is_ready:
        return error_response(
            503, "not_ready", "the task store is unreachable or not migrated", headers={"Retry-After": "1"}
        )
    return JSONBody({"status": "ready"})
