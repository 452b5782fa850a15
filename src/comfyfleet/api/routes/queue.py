"""``/api/v1/queue``: how much work waits and runs."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from comfyfleet.api.schemas import QueueMetricsOut, error_responses
from comfyfleet.http.deps import PrincipalDep, StoreDep
from comfyfleet.http.responses import JSONBody
from comfyfleet.http.wire import queue_metrics_json

router = APIRouter(tags=["queue"])


@router.get(
    "/queue/metrics",
    response_model=QueueMetricsOut,
    summary="Queue metrics",
    responses=error_responses(401, 503),
)
async def queue_metrics(principal: PrincipalDep, store: StoreDep) -> Response:
    """Tasks per status and the age of the oldest pending task (null when none waits); a tenant's own
    tasks only, every tenant's for an admin key."""
    metrics = await store.queue_metrics(tenant=principal.visible_tenant)
    return JSONBody(queue_metrics_json(metrics))
