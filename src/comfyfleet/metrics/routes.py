"""``GET /metrics``: the Prometheus exposition, served as part of the HTTP edge."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import Response

from comfyfleet.http.deps import ServicesDep
from comfyfleet.metrics import render_metrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}}, "description": "The text exposition format."}
    },
)
async def metrics(services: ServicesDep) -> Response:
    """Tasks by status and priority, workers by state and pool, dispatch latency and task duration
    histograms, worker start-up time, failures by kind and webhook attempts. No API key needed: it
    holds counts only, never task contents."""
    settings = services.settings
    pools = [pool.name for pool in settings.pools] + (["default"] if settings.workers else [])
    return Response(await render_metrics(services.store, pools), media_type=CONTENT_TYPE_PLAIN_0_0_4)
