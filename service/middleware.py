"""Pure ASGI middleware: request metrics and the request body size cap.

Both are plain ASGI callables rather than ``BaseHTTPMiddleware``, which would add a task and a
memory stream per request on the latency-critical path.
"""

from __future__ import annotations

import re
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError, expect
from service.metrics import OTHER_MODEL, ServiceMetrics

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_READINESS = frozenset({"/readyz", "/v2/health/ready"})
_MODEL_IN_PATH = re.compile(r"^/v[12]/models/([^/]+)")


def _route_template(scope: Scope, router) -> str:
    route = scope.get("route")
    if route is None and router is not None:  # not routed (404, 405): match it here
        for r in router.routes:
            match, _ = r.matches(scope)
            if match is not Match.NONE:
                route = r
                break
    return getattr(route, "path", None) or "<unmatched>"


def _model_label(scope: Scope) -> str:
    registry = getattr(scope["app"].state, "registry", None) if "app" in scope else None
    params = scope.get("path_params") or {}
    name = params.get("name") or params.get("model_name")
    if name is None and "route" not in scope:  # not routed: read it off the path
        m = _MODEL_IN_PATH.match(scope.get("path", ""))
        name = m.group(1) if m else None
    if name is None:
        return ""
    return registry.model_label(name) if registry is not None else OTHER_MODEL


class MetricsMiddleware:
    """Counts every request by route template, method, model and status; times it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, router=None) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            route = _route_template(scope, self.router)
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            model = _model_label(scope)
            if route in _READINESS and status in (400, 503):
                # "Not ready" is a correct answer of a readiness probe (while loading or
                # draining), not a failure of the service.
                outcome = "not_ready"
            else:
                outcome = ("success" if status < 400 else "client_error" if status < 500
                           else "server_error")
            metrics.child(metrics.requests, route, method, model, str(status), outcome).inc()
            metrics.child(metrics.request_duration, route, method, model).observe(
                time.perf_counter() - start)


class BodyLimitMiddleware:
    """Caps request bodies at ``max_bytes`` (413), reading nothing itself.

    The body is counted as the app reads it: a route reads its body only after its
    dependencies (the API-key checks) passed, so a request without a valid key is refused
    from its headers alone, before any of its body is read. A declared Content-Length above
    the cap is refused at the first read, before any byte of the body is received; chunked
    uploads (no Content-Length) are counted as they arrive and cut off at the cap, so neither
    can make the server buffer more than ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        total = 0
        first = True

        async def limited() -> Message:
            nonlocal total, first
            if first:
                first = False
                if declared is not None and declared > self.max_bytes:
                    raise self._too_large(f"{declared} bytes")
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes (chunked)")
            return message

        await self.app(scope, limited, send)

    def _too_large(self, received: str) -> ServiceError:
        # Raised inside the route's body read, so the app's error handlers answer it (in the
        # route's format, counted under its model); the rest of the body is never read, so the
        # connection is closed after the answer.
        return expect(f"a request body of at most {self.max_bytes} bytes "
                      "(ANOMALY_MAX_BODY_BYTES)", received, code="payload_too_large",
                      status_code=413, headers={"Connection": "close"})
