"""Liveness and readiness.

``/healthz`` answers as soon as the process serves HTTP and never looks at the models (a
liveness probe must not restart a pod that is only loading). ``/readyz`` is 200 only when every
model in the directory has a loaded, verified and warmed-up version, else 503.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.errors import expect
from service.schemas import ErrorResponse, Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True,
            summary="Liveness")
async def healthz() -> dict:
    """200 while the process is up; independent of the models."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, response_model_exclude_none=True,
            summary="Readiness",
            responses={503: {"model": ErrorResponse, "description": "Not ready"}})
async def readyz(request: Request) -> dict:
    """200 when every model is loaded and warmed up; 503 (with the reason) otherwise."""
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not registry.ready:
        reason = registry.not_ready_reason() if registry is not None else "not started"
        raise expect("every model loaded and warmed up", reason, code="not_ready",
                     status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready"}
