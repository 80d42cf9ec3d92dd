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

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from anomaly.errors import AnomalyError

log = logging.getLogger("anomaly.service")

#: Error codes that mean "the request's content was rejected"; they are counted in
#: ``anomaly_input_rejections_total{reason=CODE}`` (a fixed set, so a bounded label).
INPUT_ERROR_CODES = frozenset({
    "invalid_json", "validation_error", "unsupported_media_type", "payload_too_large",
    "empty_batch", "batch_too_large", "invalid_shape", "invalid_dtype", "non_finite",
    "out_of_range", "invalid_base64", "invalid_image", "image_too_large",
    "unknown_operating_point", "invalid_multipart", "invalid_tensor", "unknown_output",
    "json_too_complex", "too_many_pixels",
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
        request.app.state.metrics.input_rejections.labels(model=_model_label(request),
                                                          reason=err.code).inc()
    status = err.status_code
    if status == 422 and is_v2(request.url.path):
        status = 400  # V2 servers (Triton, KServe) answer 400 for every invalid request
    return error_response(request.url.path, status, err.code, err.message, err.headers)


#: Bytes of a body scanned at once by :func:`check_json_structure`: bounds its temporaries.
_SCAN_CHUNK = 1 << 20


def _outside(positions: np.ndarray, quotes: np.ndarray, before: int) -> np.ndarray:
    """The ``positions`` outside every string: an even count of unescaped quotes before them
    (``before`` ahead of the chunk, then those of ``quotes``, sorted)."""
    return positions[((np.searchsorted(quotes, positions) + before) & 1) == 0]


def check_json_structure(body: bytes, *, max_depth: int, max_keys: int) -> None:
    """Refuse a JSON body nested deeper than ``max_depth`` or with more than ``max_keys``
    object keys, from its bytes alone, before any parser or validator spends time on it.

    Vectorized (numpy, which releases the GIL on large arrays, so a worker thread running it
    does not stall the event loop): quotes that an odd run of backslashes escapes are dropped,
    a colon or bracket with an even number of the remaining quotes before it is outside every
    string, and the depth is the running sum of the brackets outside strings. Only the
    positions of those few characters are worked on, a megabyte of the body at a time.
    """
    # Counted in the raw bytes, strings included, the keys and brackets can only be more than
    # the structural ones, and the depth is at most the brackets: a body within both bounds
    # passes without the numpy passes (about 22 us of a single 28x28 image's request, at
    # concurrency 8 7% of the event loop's time; py-spy on the service).
    if body.count(b":") <= max_keys and body.count(b"[") + body.count(b"{") <= max_depth:
        return
    a = np.frombuffer(body, np.uint8)
    escaped = None
    if b"\\" in body:
        runs = np.diff(np.concatenate(([0], (a == 92).view(np.int8), [0])))  # backslashes
        starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
        escaped = ends[((ends - starts) & 1 == 1) & (ends < len(a))]  # the char after an odd run

    keys = level = depth = before = 0  # before: unescaped quotes ahead of the chunk
    for start in range(0, len(a), _SCAN_CHUNK):
        chunk = a[start : start + _SCAN_CHUNK]
        quotes = np.flatnonzero(chunk == 34) + start  # "
        if escaped is not None and quotes.size:
            quotes = quotes[~np.isin(quotes, escaped, assume_unique=True)]
        keys += _outside(np.flatnonzero(chunk == 58) + start, quotes, before).size  # :
        folded = chunk & 0xDF  # [ and { to 0x5B, ] and } to 0x5D
        found = _outside(np.flatnonzero((folded == 0x5B) | (folded == 0x5D)) + start, quotes,
                         before)
        if found.size:
            running = np.cumsum(np.where(folded[found - start] == 0x5B, 1, -1)) + level
            depth, level = max(depth, int(running.max())), int(running[-1])
        before += quotes.size
    if keys > max_keys:
        raise expect(f"a JSON body with at most {max_keys} object keys (ANOMALY_MAX_JSON_KEYS)",
                     f"{keys} keys", code="json_too_complex", status_code=400)
    if depth > max_depth:
        raise expect(f"JSON nested at most {max_depth} levels deep (ANOMALY_MAX_JSON_DEPTH)",
                     f"{depth} levels", code="json_too_complex", status_code=400)


def parse_json(body: bytes, what: str = "a JSON body", *, max_depth: int = 32,
               max_keys: int = 1000):
    """``json.loads`` whose every failure is a 400 naming where it broke.

    The body's nesting depth and key count are limited before it is parsed
    (:func:`check_json_structure`). CPU-bound: call it off the event loop for large bodies.
    """
    if not body:
        raise expect(what, "an empty body", code="invalid_json", status_code=400)
    check_json_structure(body, max_depth=max_depth, max_keys=max_keys)
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
    except ValueError:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        detail = "a number too long to convert"
    raise expect(what, f"invalid JSON ({detail})", code="invalid_json", status_code=400)


def parse_body(body: bytes, model, what: str, *, status_code: int = 422, max_depth: int = 32,
               max_keys: int = 1000):
    """A JSON object body validated as the pydantic ``model``; every failure a ServiceError."""
    obj = parse_json(body, f"a JSON {what}", max_depth=max_depth, max_keys=max_keys)
    if not isinstance(obj, dict):
        raise expect(f"a JSON object {what}", f"a JSON {json_type(obj)}",
                     code="validation_error", status_code=status_code)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ServiceError(status_code, "validation_error",
                           describe_pydantic_error(exc.errors(include_url=False)[0])) from None


def json_type(v) -> str:
    """The JSON name of a parsed value's type ("array", "object", "string", ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list | tuple):
        return "array"
    if isinstance(v, str):
        return "string"
    return type(v).__name__


def preview(value, limit: int = 60) -> str:
    """A client's value described for an error message: its JSON type and a truncated
    rendering, bounded in depth and length (``repr`` of a value nested 1000 levels deep
    raises RecursionError, and of a large one echoes it all)."""
    text = _render(value, limit + 1, 0)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"a JSON {json_type(value)} {text}"


def _render(v, budget: int, depth: int) -> str:
    if isinstance(v, str):
        return json.dumps(v[:budget])
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int) and not isinstance(v, bool):
        digits = len(str(v)) if abs(v) < 10**40 else None
        return str(v) if digits is not None else f"<a {v.bit_length()}-bit integer>"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple | dict):
        opener, closer = ("{", "}") if isinstance(v, dict) else ("[", "]")
        if not v:
            return opener + closer
        if depth >= 3:  # bounded recursion: deeper levels are elided
            return opener + "..." + closer
        items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
        parts: list[str] = []
        used = 2
        for key, item in items:
            if used >= budget:
                parts.append("...")
                break
            part = _render(item, budget - used, depth + 1)
            if key is not None:
                part = f"{json.dumps(str(key)[:budget])}: {part}"
            parts.append(part)
            used += len(part) + 2
        return opener + ", ".join(parts) + closer
    return f"<{type(v).__name__}>"


def describe_pydantic_error(err: dict) -> str:
    """One pydantic error as "Expected X. Received: Y" (the value bounded, never recursed)."""
    loc = [str(p)[:40] for p in err.get("loc", ()) if p not in ("body",)]
    where = ".".join(loc) or "the body"
    kind = err.get("type", "")
    if kind == "missing":
        return f"Expected the field '{where}'. Received: no '{where}'"
    if kind == "extra_forbidden":
        return f"Expected only the documented fields (see /docs). Received: unknown field '{where}'"
    msg = str(err.get("msg", "a valid value"))
    msg = msg.removeprefix("Input should be ").removeprefix("Value error, ")
    return f"Expected {where} to be {msg}. Received: {preview(err.get('input'))}"


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
        path = request.url.path
        shown = path if len(path) <= 120 else path[:117] + "..."
        message = (f"Expected a route of this service (see /docs). Received: "
                   f"{request.method} {shown}")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Expected one of the methods {allowed}. Received: {request.method}"
    elif exc.status_code == 400 and "multipart" in str(exc.detail).lower():
        code, message = "invalid_multipart", f"Expected a valid multipart form. Received: {exc.detail}"
    else:
        message = str(exc.detail)
    return _respond(request, ServiceError(exc.status_code, code, message, headers=exc.headers))


async def _disconnected(request: Request, exc: ClientDisconnect):
    # The client left while its body was being read: nobody reads this answer, and it is not
    # a failure of the service (no traceback, counted as a client error).
    return error_response(request.url.path, 400, "client_disconnected",
                          "Expected the whole request body. Received: a disconnect")


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
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(Exception, _unexpected)
