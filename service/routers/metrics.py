"""``GET /metrics``: Prometheus exposition (text format, or OpenMetrics when asked for)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def get_metrics(request: Request, metrics: MetricsDep) -> Response:
    """Every metric of :mod:`service.metrics`, plus process CPU and memory."""
    # Runs on the event loop on purpose: the registry's gauges are updated there too, so a
    # scrape never sees a reload half-published.
    body, content_type = metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
