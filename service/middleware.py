"""Pure ASGI middleware: request metrics and the request body size cap.

Both are plain ASGI callables rather than ``BaseHTTPMiddleware``, which would add a task and a
memory stream per request on the latency-critical path.
"""

from __future__ import annotations

import re
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_body

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MODEL_IN_PATH = re.compile(r"^/v[12]/models/([^/]+)")


def _route_template(scope: Scope, router) -> str:
    route = scope.get("route")
    if route is None and router is not None:  # rejected before routing (413): match it here
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
    if name is None and "route" not in scope:  # not routed (413): read it off the path
        m = _MODEL_IN_PATH.match(scope.get("path", ""))
        name = m.group(1) if m else None
    if name is None:
        return ""
    return registry.model_label(name) if registry is not None else metrics.OTHER_MODEL


class MetricsMiddleware:
    """Counts every request by route template, method, model and status; times it."""

    def __init__(self, app: ASGIApp, router=None) -> None:
        self.app = app
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

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.IN_FLIGHT.dec()
            route = _route_template(scope, self.router)
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            model = _model_label(scope)
            outcome = ("success" if status < 400 else "client_error" if status < 500
                       else "server_error")
            metrics.REQUESTS.labels(route, method, model, str(status), outcome).inc()
            metrics.REQUEST_DURATION.labels(route, method, model).observe(
                time.perf_counter() - start)


class BodyLimitMiddleware:
    """Reads request bodies up to ``max_bytes``; answers 413 as soon as one is larger.

    The declared Content-Length is checked first; chunked uploads (no Content-Length) are
    counted as they arrive and cut off at the cap, so neither can make the server buffer more
    than ``max_bytes``. The buffered body is then replayed to the app.
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
                declared = value
                break
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size > self.max_bytes:
                await self._reject(scope, send, f"{size} bytes")
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(scope, send, f"more than {self.max_bytes} bytes (chunked)")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, received: str) -> None:
        metrics.INPUT_REJECTIONS.labels(_model_label(scope), "payload_too_large").inc()
        body = error_body(scope.get("path", ""), "payload_too_large",
                          f"Expected a request body of at most {self.max_bytes} bytes "
                          f"(ANOMALY_MAX_BODY_BYTES). Received: {received}")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
