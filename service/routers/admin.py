"""Admin routes (their own API keys): reload the models directory."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AdminAuth, RegistryDep
from service.errors import ServiceError
from service.schemas import ERROR_RESPONSES, ReloadReport

router = APIRouter(prefix="/v1/models", tags=["admin"], dependencies=[AdminAuth],
                   responses=ERROR_RESPONSES)


@router.post("/reload", response_model=ReloadReport, summary="Rescan the models directory")
async def reload_models(registry: RegistryDep) -> dict:
    """Verify, load and warm up new or changed versions, then swap them in atomically.

    In-flight requests finish on the models they started with. A version that fails is refused
    (listed under ``refused``) and what served before keeps serving. 503 when the directory
    cannot be read (nothing changes then).
    """
    await registry.wait_loaded()  # a reload during the first load would only repeat it
    report = await registry.reload()
    if "error" in report:
        raise ServiceError(503, "reload_failed", report["error"])
    return report
