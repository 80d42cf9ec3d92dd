"""The FastAPI application: ``create_app(settings)`` and the module-level ``app``.

``uvicorn service.app:app`` (settings from ``ANOMALY_*`` variables), ``uvicorn --factory
service.app:create_app`` and ``anomaly serve --models DIR`` all run the same app. Creating the
app loads nothing: models load in the background once the server starts (``lifespan``), so
``/healthz`` answers at once and ``/readyz`` turns 200 when every model is warmed up.

One worker per process: the model registry, the micro-batcher and the Prometheus metrics live
in the process. Scale by running more replicas behind a load balancer (each one a scrape
target), not with ``--workers``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from anomaly import __version__
from anomaly.errors import AnomalyError
from service import errors
from service.deps import key_digests
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.registry import Registry
from service.routers import admin, feedback, health, models, ui, v2
from service.routers import metrics as metrics_router
from service.schemas import install_openapi
from service.scoring import Admission
from service.settings import Settings, load_settings
from service.shutdown import install_drain_handler

DESCRIPTION = """Scores images with the autoencoder anomaly detectors that `anomaly fit` writes
(each model's image shape is in `GET /v1/models/{name}`). **Scores: higher = more anomalous**; `is_anomaly` is `score > threshold`
at the chosen operating point.

Errors are `{"error": {"code": ..., "message": "Expected X. Received: Y"}}` (under `/v2`:
`{"error": "..."}`, the KServe V2 format).
"""


def _configure_logging(level: str) -> None:
    # python-multipart logs every malformed upload it sees; a client's bad body is answered
    # with a 400 and is not worth a server log line.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    log = logging.getLogger("anomaly.service")
    log.setLevel(level.upper())
    if not log.handlers:  # uvicorn configures only its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. ``settings`` defaults to the ``ANOMALY_*`` environment."""
    settings = settings or load_settings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = Registry(settings, app.state.metrics)
        app.state.registry = registry
        app.state.cpu_pool = ThreadPoolExecutor(settings.cpu_threads,
                                                thread_name_prefix="anomaly-cpu")
        app.state.metrics.set_build_info()
        gc_before = gc.get_threshold()
        if settings.gc_threshold:
            gc.set_threshold(settings.gc_threshold, *gc_before[1:])
        registry.start()
        # FastAPI builds the OpenAPI document on first request, on the event loop (~0.1 s of
        # CPU): build it now in a worker thread instead.
        asyncio.get_running_loop().run_in_executor(app.state.cpu_pool, app.openapi)
        restore_sigterm = install_drain_handler(registry.drain, settings.shutdown_drain_seconds)
        try:
            yield
        finally:
            restore_sigterm()
            gc.set_threshold(*gc_before)
            await registry.close()
            app.state.cpu_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="anomaly scoring service", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.admission = Admission(settings.max_queued_images)
    app.state.metrics = metrics = ServiceMetrics(settings.drift_window)
    app.state.scoring_key_digests = key_digests(settings.api_keys)
    app.state.admin_key_digests = key_digests(settings.admin_api_keys)
    errors.install(app)
    for r in (health.router, metrics_router.router, admin.router, feedback.router, models.router,
              v2.router, ui.router):
        app.include_router(r)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, router=app.router)  # outermost: sees every answer
    install_openapi(app, settings)
    return app


def __getattr__(name: str):
    """``service.app:app`` for uvicorn, built on first access rather than at import, so that
    ``anomaly serve`` (which calls :func:`create_app` with its flags) never depends on the
    environment alone, and a bad ``ANOMALY_*`` variable is one error line, not a traceback."""
    if name != "app":
        raise AttributeError(f"module 'service.app' has no attribute {name!r}")
    global app
    try:
        app = create_app()
    except AnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return app
