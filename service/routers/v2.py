"""Open Inference Protocol (KServe V2) REST routes, with the binary tensor data extension.

Existing V2 clients work unchanged: tritonclient's HTTP client (which sends tensors as binary
data by default), KServe, Seldon MLServer's clients. The model ``{m}`` has one input and three
outputs:

- input ``images``: FP32, FP64 or UINT8, shape ``[N, H, W]`` or ``[N, H*W]`` for the model's
  image shape (e.g. ``[N, H, W]`` and ``[N, H*W]`` for a grey model; the metadata lists both, and every
  datatype, under ``inputs[0].parameters``); pixel scale decided per image by the same rule as
  everywhere, see :mod:`service.inputs`;
- outputs ``anomaly_score`` (FP64 ``[N]``, higher = more anomalous), ``is_anomaly`` (BOOL
  ``[N]``, at the operating point given as the request parameter ``operating_point``, else the
  model's default) and ``reconstruction`` (FP32, the input's shape).

The requested ``outputs`` are honoured; without ``outputs`` the reply carries
:data:`DEFAULT_OUTPUTS` (score and decision: a reconstruction is as large as the input and
costs a decoder pass, so it is sent only when named). A request ``id`` is echoed, and errors are ``{"error": "..."}``. Binary data: a request whose
``Inference-Header-Content-Length`` header is set carries its JSON header first and then the
raw little-endian tensors of the inputs that declare ``binary_data_size``; outputs are returned
binary when they ask for ``binary_data`` (or the request parameter ``binary_data_output`` is
true), with ``Inference-Header-Content-Length`` set on the response. Request bodies compressed
with ``Content-Encoding: gzip``/``deflate`` are accepted (the decompressed size is capped too).

Health follows the spec wording: ready endpoints answer 200 when ready and 400 otherwise
(``/readyz`` is the Kubernetes-style 503 one).
"""

from __future__ import annotations

import json
import math
import time
import zlib

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from anomaly import __version__
from service import inputs
from service.deps import MetricsDep, RegistryDep, ScoringAuth, SettingsDep, find_entry, find_model
from service.errors import expect, parse_body, preview
from service.schemas import (
    V2_DEFAULT_OUTPUTS,
    V2_DTYPES,
    V2_ERROR_RESPONSES,
    V2_INPUT,
    V2_OUTPUTS,
    V2_READY_RESPONSES,
    V2InferRequest,
    V2InferResponse,
)
from service.scoring import INLINE_BINARY_BYTES, INLINE_BYTES, cpu_work, score_images
from service.shapes import image_shape, tensor_shapes

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"],
                   responses=V2_ERROR_RESPONSES)

INPUT, OUTPUTS, DEFAULT_OUTPUTS, _DTYPES = V2_INPUT, V2_OUTPUTS, V2_DEFAULT_OUTPUTS, V2_DTYPES


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    """Name, version and the protocol extensions supported."""
    return {"name": "anomaly", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server ready", responses=V2_READY_RESPONSES)
async def ready(registry: RegistryDep) -> JSONResponse:
    """200 when every model is loaded and warmed up, else 400 (the V2 spec's 4xx)."""
    ok = registry.ready
    body = {"ready": ok} if ok else {"ready": False, "error": registry.not_ready_reason()}
    return JSONResponse(body, status_code=200 if ok else 400)


def _flag(params: dict, name: str, default: bool) -> bool:
    """A boolean request parameter: JSON true/false only (the string "false" is not true)."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise _bad(f"the parameter {name} as a JSON boolean (true or false)", preview(value),
                   code="validation_error")
    return value


def _metadata(model) -> dict:
    shape = image_shape(model.detector)
    accepted = tensor_shapes(shape)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": getattr(model.detector, "platform", "tensorflow_keras"),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": accepted[0],
                    "parameters": {"datatypes": list(_DTYPES), "shapes": accepted}}],
        "outputs": [{"name": "anomaly_score", "datatype": "FP64", "shape": [-1]},
                    {"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]},
                    {"name": "reconstruction", "datatype": "FP32", "shape": accepted[0]}],
        "parameters": {"operating_points": sorted(model.calibration.operating_points),
                       "default_operating_point": model.calibration.default,
                       "default_outputs": list(DEFAULT_OUTPUTS),
                       "artifact_sha256": model.sha256},
    }


@router.get("/models/{model_name}", summary="Model metadata", dependencies=[ScoringAuth])
async def model_metadata(model_name: str, registry: RegistryDep) -> dict:
    meta = _metadata(find_model(registry, model_name))
    meta["versions"] = sorted(find_entry(registry, model_name).versions, reverse=True)
    return meta


@router.get("/models/{model_name}/versions/{version}", summary="Model version metadata",
            dependencies=[ScoringAuth])
async def model_version_metadata(model_name: str, version: str, registry: RegistryDep) -> dict:
    return _metadata(find_model(registry, model_name, version))


def _model_ready(registry, model_name: str, version: str | None) -> JSONResponse:
    entry = find_entry(registry, model_name)  # 404 for an unknown model
    ok = entry.ready if version is None else version in entry.versions
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 400)


@router.get("/models/{model_name}/ready", summary="Model ready", responses=V2_READY_RESPONSES)
async def model_ready(model_name: str, registry: RegistryDep) -> JSONResponse:
    return _model_ready(registry, model_name, None)


@router.get("/models/{model_name}/versions/{version}/ready", summary="Model version ready",
            responses=V2_READY_RESPONSES)
async def model_version_ready(model_name: str, version: str,
                              registry: RegistryDep) -> JSONResponse:
    return _model_ready(registry, model_name, version)


# The body schema is set by service.schemas.install_openapi (strict, from the loaded models).
_INFER_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object"}}}}}


@router.post("/models/{model_name}/infer", summary="Infer", response_model=V2InferResponse,
             dependencies=[ScoringAuth], openapi_extra=_INFER_DOC)
async def infer(model_name: str, request: Request, registry: RegistryDep,
                settings: SettingsDep, metrics: MetricsDep) -> Response:
    """Score ``images`` with the model's default version."""
    return await _infer(request, find_model(registry, model_name), settings, metrics)


@router.post("/models/{model_name}/versions/{version}/infer", summary="Infer with a version",
             response_model=V2InferResponse, dependencies=[ScoringAuth],
             openapi_extra=_INFER_DOC)
async def infer_version(model_name: str, version: str, request: Request, registry: RegistryDep,
                        settings: SettingsDep, metrics: MetricsDep) -> Response:
    """Score ``images`` with a named loaded version."""
    return await _infer(request, find_model(registry, model_name, version), settings, metrics)


def _bad(what: str, received: object, code: str = "invalid_tensor", status: int = 400):
    return expect(what, received, code=code, status_code=status)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise _bad("Content-Encoding gzip, deflate or none", repr(encoding),
                   code="unsupported_media_type", status=415)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise _bad(f"a {encoding}-compressed body", "bytes that do not decompress",
                   code="invalid_json") from None
    if len(out) > limit:
        raise _bad(f"a decompressed body of at most {limit} bytes (ANOMALY_MAX_BODY_BYTES)",
                   "more", code="payload_too_large", status=413)
    return out


def _split_body(header_len: str | None, body: bytes) -> tuple[bytes, memoryview]:
    if header_len is None:
        return body, memoryview(b"")
    try:
        n = int(header_len)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise _bad(f"an Inference-Header-Content-Length in 1..{len(body)} (the body size)",
                   repr(header_len[:24]))
    return body[:n], memoryview(body)[n:]


def _read_input(req: V2InferRequest, binary: memoryview, max_images: int,
                shape: tuple[int, int, int]) -> np.ndarray:
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT:
        raise _bad(f"exactly one input named {INPUT!r}",
                   preview([t.name for t in req.inputs[:8]]))
    t = req.inputs[0]
    dtype = _DTYPES.get(t.datatype)
    if dtype is None:
        raise _bad(f"input {INPUT!r} of datatype {sorted(_DTYPES)}", preview(t.datatype),
                   code="invalid_dtype")
    accepted = tensor_shapes(shape)
    tensor_shape = t.shape
    if len(tensor_shape) < 2 or not any(
            tensor_shape[1:] == a[1:] for a in accepted):
        raise _bad(f"input {INPUT!r} of shape {' or '.join(map(str, accepted))} "
                   "(-1: any batch size)", preview(tensor_shape), code="invalid_shape")
    n = tensor_shape[0]
    if n < 0:
        raise _bad(f"input {INPUT!r} with N >= 1", preview(tensor_shape), code="invalid_shape")
    inputs.check_batch_size(n, max_images, what=f"input {INPUT!r}")
    count = n * math.prod(shape)
    params = t.parameters or {}
    size = params.get("binary_data_size")
    if size is not None:
        if t.data is not None:
            raise _bad(f"input {INPUT!r} with either 'data' or binary data", "both")
        if (not isinstance(size, int) or isinstance(size, bool)
                or size != count * dtype.itemsize or size > len(binary)):
            raise _bad(f"{count * dtype.itemsize} bytes of binary {t.datatype} data for shape "
                       f"{tensor_shape}", f"binary_data_size {preview(size)} with "
                       f"{len(binary)} bytes after the JSON header", code="invalid_shape")
        arr = np.frombuffer(binary[:size], dtype=dtype)
    else:
        if t.data is None:
            raise _bad(f"input {INPUT!r} with 'data' or binary_data_size", "neither")
        try:
            raw = np.asarray(t.data)
        except (ValueError, TypeError):
            raise _bad(f"input {INPUT!r} data as a (flat or nested) list of numbers",
                       "ragged nesting", code="invalid_shape") from None
        if raw.dtype == bool or raw.dtype.kind not in "uif":
            raise _bad(f"numbers in the data of input {INPUT!r}", f"dtype {raw.dtype}",
                       code="invalid_dtype")
        if raw.size != count:
            raise _bad(f"{count} values for shape {tensor_shape}", f"{raw.size}",
                       code="invalid_shape")
        if dtype.kind == "u" and raw.dtype.kind == "f":
            raise _bad("integers in the data of a UINT8 input", "floating-point values",
                       code="invalid_dtype")
        arr = raw.astype(dtype) if dtype.kind == "f" else raw
    return arr.reshape(n, *tensor_shape[1:])


def _encode(name: str, arr: np.ndarray, datatype: str, binary: bool,
            blobs: list[bytes]) -> dict:
    out = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        raw = np.ascontiguousarray(arr).tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        blobs.append(raw)
    else:
        out["data"] = arr.ravel().tolist()
    return out


def _small(body: bytes, encoding: str, header_len: str | None) -> bool:
    """Whether parsing ``body`` is cheap enough for the event loop (:func:`cpu_work`)."""
    if encoding not in ("", "identity"):  # a compressed body may inflate to far more
        return False
    json_bytes = len(body)
    if header_len is not None:
        try:
            json_bytes = int(header_len)
        except ValueError:
            return False  # _parse says what is wrong with it
    return json_bytes <= INLINE_BYTES and len(body) <= INLINE_BYTES + INLINE_BINARY_BYTES


def _parse(body: bytes, encoding: str, header_len: str | None, settings,
           shape: tuple[int, int, int]):
    """The whole request -> (request, wanted outputs, operating point, raw tensor, images).

    CPU-bound (decompression, JSON, validation): off the event loop unless :func:`_small`.
    """
    if encoding not in ("", "identity"):
        body = _decompress(body, encoding, settings.max_body_bytes)
    header, binary = _split_body(header_len, body)
    req = parse_body(header, V2InferRequest, "inference request", status_code=400,
                     max_depth=settings.max_json_depth, max_keys=settings.max_json_keys)
    params = req.parameters or {}
    binary_default = _flag(params, "binary_data_output", False)
    if req.outputs:
        wanted = []
        for o in req.outputs:
            if o.name not in OUTPUTS:
                raise _bad(f"outputs among {list(OUTPUTS)}", preview(o.name),
                           code="unknown_output")
            wanted.append((o.name, _flag(o.parameters or {}, "binary_data", binary_default)))
    else:
        wanted = [(name, binary_default) for name in DEFAULT_OUTPUTS]
    op_name = params.get("operating_point")
    if op_name is not None and not isinstance(op_name, str):
        raise _bad("the parameter operating_point as a string", preview(op_name),
                   code="unknown_operating_point")
    raw = _read_input(req, binary, settings.max_batch_images, shape)
    return req, wanted, op_name, raw, inputs.tensor_images(raw, shape)


def _respond(req: V2InferRequest, model, scored, wanted, raw_shape) -> tuple[bytes, bytes]:
    """The JSON header and binary blobs of the reply; CPU-bound for reconstructions."""
    blobs: list[bytes] = []
    outputs = []
    for name, as_binary in wanted:
        if name == "anomaly_score":
            outputs.append(_encode(name, scored.scores.astype("<f8"), "FP64", as_binary, blobs))
        elif name == "is_anomaly":
            outputs.append(_encode(name, scored.is_anomaly.astype(bool), "BOOL", as_binary,
                                   blobs))
        else:
            recon = scored.reconstruction.astype("<f4").reshape(raw_shape)
            outputs.append(_encode(name, recon, "FP32", as_binary, blobs))
    resp = {"model_name": model.name, "model_version": model.version}
    if req.id is not None:
        resp["id"] = req.id
    resp["parameters"] = {"operating_point": scored.operating_point,
                          "threshold": scored.threshold}
    resp["outputs"] = outputs
    return json.dumps(resp, allow_nan=False).encode(), b"".join(blobs)


async def _infer(request: Request, model, settings, metrics) -> Response:
    # Full: refused before the body is read (or paid for).
    with request.app.state.admission.ticket() as ticket:
        return await _infer_admitted(request, model, settings, metrics, ticket)


async def _infer_admitted(request: Request, model, settings, metrics, ticket) -> Response:
    start = time.perf_counter()
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    header_len = request.headers.get("inference-header-content-length")
    small = _small(body, encoding, header_len)
    req, wanted, op_name, raw, x = await cpu_work(
        request, small, _parse, body, encoding, header_len,
        settings, image_shape(model.detector))
    full = any(name == "reconstruction" for name, _ in wanted)
    ticket.resize(len(x))
    scored = await score_images(metrics, model, x, op_name, full=full,
                                decode_s=time.perf_counter() - start)
    encode_start = time.perf_counter()
    head, blobs = await cpu_work(request, small and not full, _respond,
                                 req, model, scored, wanted, raw.shape)
    metrics.child(metrics.stage_duration, model.name, "encode").observe(
        time.perf_counter() - encode_start)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + blobs, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
