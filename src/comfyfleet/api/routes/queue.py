"""``/api/v1/queue``: how much work waits and runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from comfyfleet.api.auth import Principal, authenticate
from comfyfleet.api.deps import get_store
from comfyfleet.api.schemas import JSONBody, QueueMetricsOut, error_responses, queue_metrics_json
from comfyfleet.store import Store

router = APIRouter(tags=["queue"])


@router.get(
    "/queue/metrics",
    response_model=QueueMetricsOut,
    summary="Queue metrics",
    responses=error_responses(401, 503),
)
async def queue_metrics(
    principal: Annotated[Principal, Depends(authenticate)], store: Annotated[Store, Depends(get_store)]
) -> Response:
    """Tasks per status and the age of the oldest pending task (null when none waits); a tenant's own
    tasks only, every tenant's for an admin key."""
    metrics = await store.queue_metrics(tenant=principal.visible_tenant)
    return JSONBody(queue_metrics_json(metrics))
