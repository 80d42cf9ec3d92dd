"""One error format for every failure, including FastAPI's validation errors and 404/405/413.

``/v1`` and the other routes answer ``{"error": {"code": "...", "message": "Expected X.
Received: Y"}}``; the Open Inference Protocol routes (``/v2``) answer ``{"error": "..."}``, as
the KServe V2 REST spec says, with 400 where v1 says 422 (as Triton and KServe do). Unexpected exceptions become a 500 with a generic message (the
traceback goes to the server log only), so a client never sees internals.
"""

from __future__ import annotations

import contextlib
import json
import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomaly.errors import AnomalyError
from service import metrics

log = logging.getLogger("anomaly.service")

#: Error codes that mean "the request's content was rejected"; they are counted in
#: ``anomaly_input_rejections_total{reason=CODE}`` (a fixed set, so a bounded label).
INPUT_ERROR_CODES = frozenset({
    "invalid_json", "validation_error", "unsupported_media_type", "payload_too_large",
    "empty_batch", "batch_too_large", "invalid_shape", "invalid_dtype", "non_finite",
    "out_of_range", "invalid_base64", "invalid_image", "image_too_large",
    "unknown_operating_point", "invalid_multipart", "invalid_tensor", "unknown_output",
})


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a readable message."""

    def __init__(self, status_code: int, code: str, message: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


def expect(what: str, received: object, *, code: str, status_code: int = 422,
           headers: dict[str, str] | None = None) -> ServiceError:
    """A :class:`ServiceError` in the project's message style "Expected X. Received: Y"."""
    return ServiceError(status_code, code, f"Expected {what}. Received: {received}",
                        headers=headers)


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_body(path: str, code: str, message: str) -> bytes:
    """The JSON error body for a request path (V2 format under ``/v2``)."""
    body = {"error": message} if is_v2(path) else {"error": {"code": code, "message": message}}
    return json.dumps(body).encode()


def error_response(request_path: str, status_code: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    """A complete error response in the format of ``request_path``'s API."""
    return Response(error_body(request_path, code, message), status_code=status_code,
                    headers=headers, media_type="application/json")


def _model_label(request: Request) -> str:
    registry = getattr(request.app.state, "registry", None)
    name = request.path_params.get("name") or request.path_params.get("model_name")
    return registry.model_label(name) if registry is not None else ""


def _respond(request: Request, err: ServiceError) -> Response:
    if err.code in INPUT_ERROR_CODES:
        metrics.INPUT_REJECTIONS.labels(model=_model_label(request), reason=err.code).inc()
    status = err.status_code
    if status == 422 and is_v2(request.url.path):
        status = 400  # V2 servers (Triton, KServe) answer 400 for every invalid request
    return error_response(request.url.path, status, err.code, err.message, err.headers)


def parse_json(body: bytes, what: str = "a JSON body"):
    """``json.loads`` whose every failure is a 400 ``invalid_json`` naming where it broke."""
    if not body:
        raise expect(what, "an empty body", code="invalid_json", status_code=400)
    # orjson parses a 64-image JSON batch several times faster than json, which is most of the
    # cost of serving batched JSON requests. It refuses NaN/Infinity literals, so a body it
    # refuses is read again by json, which accepts them (to be refused later, naming the
    # image) and says where a truly broken body breaks.
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.loads(body)
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except UnicodeDecodeError:
        detail = "bytes that are not UTF-8"
    except RecursionError:
        detail = "nested too deeply"
    raise expect(what, f"invalid JSON ({detail})", code="invalid_json", status_code=400)


def parse_body(body: bytes, model, what: str, *, status_code: int = 422):
    """A JSON object body validated as the pydantic ``model``; every failure a ServiceError."""
    obj = parse_json(body, f"a JSON {what}")
    if not isinstance(obj, dict):
        raise expect(f"a JSON object {what}", f"a JSON {type(obj).__name__}",
                     code="validation_error", status_code=status_code)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ServiceError(status_code, "validation_error",
                           describe_pydantic_error(exc.errors()[0])) from None


def describe_pydantic_error(err: dict) -> str:
    """One pydantic error as "Expected X. Received: Y"."""
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    where = ".".join(loc) or "the body"
    kind = err.get("type", "")
    if kind == "missing":
        return f"Expected the field '{where}'. Received: no '{where}'"
    if kind == "extra_forbidden":
        return f"Expected only the documented fields (see /docs). Received: unknown field '{where}'"
    msg = str(err.get("msg", "a valid value"))
    msg = msg.removeprefix("Input should be ").removeprefix("Value error, ")
    received = repr(err.get("input"))
    if len(received) > 80:
        received = received[:77] + "..."
    return f"Expected {where} to be {msg}. Received: {received}"


async def _service_error(request: Request, exc: ServiceError):
    return _respond(request, exc)


async def _anomaly_error(request: Request, exc: AnomalyError):
    # The pipeline's errors carry their own status; anything it calls 5xx is not the client's.
    status = exc.status_code if 400 <= exc.status_code < 500 else 422
    return _respond(request, ServiceError(status, "invalid_input", str(exc)))


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    message = describe_pydantic_error(errors[0]) if errors else "Expected a valid request."
    return _respond(request, ServiceError(422, "validation_error", message))


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 503: "not_ready"}


async def _http_error(request: Request, exc: StarletteHTTPException):
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = (f"Expected a route of this service (see /docs). Received: "
                   f"{request.method} {request.url.path}")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Expected one of the methods {allowed}. Received: {request.method}"
    elif exc.status_code == 400 and "multipart" in str(exc.detail).lower():
        code, message = "invalid_multipart", f"Expected a valid multipart form. Received: {exc.detail}"
    else:
        message = str(exc.detail)
    return _respond(request, ServiceError(exc.status_code, code, message, headers=exc.headers))


async def _unexpected(request: Request, exc: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(request.url.path, 500, "internal_error",
                          "Internal error while handling the request; see the server log.")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the one JSON error format."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(AnomalyError, _anomaly_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
