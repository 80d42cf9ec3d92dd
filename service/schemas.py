"""Request and response models (pydantic), which also make the OpenAPI docs at /docs.

``images`` is validated only shallowly by pydantic (a list); each image is then checked by
:mod:`service.inputs`, which can name the image and the reason (shape, range, NaN, base64, ...)
in one readable error instead of one pydantic error per pixel, and is several times faster on
a 64-image batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

ImageFormat = Literal["array", "png", "both"]

#: The V2 (Open Inference Protocol) tensors of every model: one input, three outputs.
V2_INPUT = "images"
V2_OUTPUTS = ("anomaly_score", "is_anomaly", "reconstruction")
#: Sent when a request names no ``outputs``: the score and the decision. A reconstruction is
#: as large as the input and costs a decoder pass, so it is sent only when asked for.
V2_DEFAULT_OUTPUTS = ("anomaly_score", "is_anomaly")
V2_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "UINT8": np.dtype("u1")}


def image_schema(shape: tuple[int, ...] | None) -> dict:
    """The JSON schema of one image in ``images``: a nested list of the models' pixel shape
    (any shape when the loaded models differ) or a base64 PNG/JPEG string."""
    array: dict = {"type": "number", "minimum": 0, "maximum": 255}
    for size in reversed(shape or (None, None)):
        array = {"type": "array", "items": array, "minItems": size or 1}
        if size:
            array["maxItems"] = size
    array["description"] = ("rows of pixels; all-integer images are 0-255, images with any "
                            "float are [0, 1] unless a value exceeds 1")
    return {"oneOf": [
        array,
        {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/*",
         "description": "base64-encoded PNG/JPEG (a data: URL is accepted); any size, "
         "converted to grayscale and resized to the model's shape"},
    ]}


class ScoreOptions(BaseModel):
    """Options of a score request (JSON body fields, form fields or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    operating_point: str | None = Field(
        None, description="Operating point name, e.g. 'fpr@1%'; the model's default if omitted.")
    return_reconstruction: bool = Field(False, description="Include each reconstruction.")
    return_error_map: bool = Field(False, description="Include each per-pixel error map.")
    image_format: ImageFormat = Field(
        "array", description="How reconstructions and error maps are returned: 'array' (nested "
        "lists of floats), 'png' (base64 PNG; error maps scaled so the image's largest error is white) "
        "or 'both'.")


class ScoreRequest(ScoreOptions):
    """``POST /v1/models/{name}/score`` JSON body."""

    images: Annotated[list[Any], WithJsonSchema({"type": "array", "items": image_schema(None),
                                                 "minItems": 1})] = (
        Field(..., description="Images: each a nested list of pixel values of the model's "
              "image shape (all-integer "
              "images are 0-255; images with any float are [0, 1] unless a value exceeds 1, "
              "then 0-255; decided per image) or a base64-encoded PNG/JPEG string."))

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": [[[0, 128], [255, 0]]], "operating_point": "fpr@1%",
         "return_reconstruction": False}]})


class ImageResult(BaseModel):
    """The result for one image, in request order."""

    index: int
    score: float = Field(description="Anomaly score; higher = more anomalous.")
    normalized_score: float = Field(description="Fraction of normal calibration images that "
                                    "scored at or below this one, in [0, 1].")
    is_anomaly: bool = Field(description="score > threshold of the operating point.")
    reconstruction: list[list[float]] | None = None
    reconstruction_png: str | None = None
    error_map: list[list[float]] | None = None
    error_map_png: str | None = None


class ScoreResponse(BaseModel):
    """``POST /v1/models/{name}/score`` response."""

    model: str
    version: str
    operating_point: str
    threshold: float
    results: list[ImageResult]


class OperatingPointInfo(BaseModel):
    name: str
    threshold: float
    method: str
    expected_fpr: float = Field(description="False-positive rate expected on new normal "
                                "images.")
    fpr_interval: list[float] | None = Field(None, description="95% exact binomial "
                                             "(Clopper-Pearson) interval of that rate.")
    n_reference: int | None = Field(None, description="Normal reference images behind the "
                                    "threshold.")
    expected_tpr: float | None = None
    target_fpr: float | None = None


class VersionInfo(BaseModel):
    """A loaded version of a model."""

    version: str
    default: bool
    dataset: str | None = None
    normal_classes: list[Any] | None = None
    class_names: list[str] | None = None
    model_type: str | None = None
    image_shape: list[int] = Field(description="(height, width, channels) of the images the "
                                   "model scores; nested-list images must have it (height "
                                   "rows of width pixels).")
    score: str
    aggregation: str
    created_at: str | None = None
    artifact_sha256: str
    default_operating_point: str
    operating_points: list[OperatingPointInfo]
    metrics: dict[str, Any] | None = Field(None, description="Test-set evaluation, if any.")
    loaded_at: float


class RefusedVersion(BaseModel):
    version: str
    error: str


class ModelInfo(BaseModel):
    """A model name with its loaded, available and refused versions."""

    name: str
    ready: bool
    default_version: str | None
    pinned_version: str | None = None
    versions: list[VersionInfo]
    available_versions: list[str]
    refused_versions: list[RefusedVersion]


class ModelList(BaseModel):
    models: list[ModelInfo]
    problems: list[str] = Field(default_factory=list,
                                description="Directory entries that are not models.")


class ReloadReport(BaseModel):
    """What ``POST /v1/models/reload`` changed."""

    loaded: list[str]
    unchanged: list[str]
    refused: list[dict[str, str]]
    removed: list[str]
    models: dict[str, dict[str, Any]]
    problems: list[str]
    ready: bool
    duration_seconds: float


class Health(BaseModel):
    status: str
    detail: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str = Field(description="'Expected X. Received: Y'")


class ErrorResponse(BaseModel):
    """Every error outside /v2."""

    error: ErrorDetail


class V2Error(BaseModel):
    """Every error under /v2 (KServe V2 format)."""

    error: str


class V2Ready(BaseModel):
    """A V2 readiness answer (200 ready, 400 not ready, as the V2 spec says)."""

    name: str | None = Field(None, description="The model (model readiness only).")
    ready: bool
    error: str | None = Field(None, description="Why not (server readiness only).")


V2_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": V2Ready, "description": "Ready"},
    400: {"model": V2Ready, "description": "Not ready"},
}


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """Open Inference Protocol request (JSON part; binary tensors may follow it)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


def v2_request_schema(outputs: tuple[str, ...], datatypes: tuple[str, ...],
                      shapes: list[list[int]] | None, max_images: int) -> dict:
    """What the infer routes accept, stricter than :class:`V2InferRequest` (which the routes
    validate loosely, to answer with the specific error codes): one input ``images`` of the
    given datatypes and shapes (``shapes`` with -1 as the batch size; ``None``: the loaded
    models differ), the outputs by name, and the parameters the service reads."""
    if shapes:
        shape = {"oneOf": [{"type": "array", "prefixItems": [
            {"type": "integer", "minimum": 1, "maximum": max_images},
            *({"const": d} for d in s[1:])], "minItems": len(s), "maxItems": len(s)}
            for s in shapes]}
    else:
        shape = {"type": "array", "items": {"type": "integer"}, "minItems": 2}
    flag = {"type": "boolean"}
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    data: dict = pixel
    for _ in range(3):  # flat, or nested like the shape (at most [N, H, W, C])
        data = {"anyOf": [pixel, {"type": "array", "items": data}]}
    return {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "Echoed in the reply."},
            "parameters": {"type": "object", "properties": {
                "operating_point": {"type": "string", "description": "An operating point "
                                    "of the model; its default when omitted."},
                "binary_data_output": flag}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["name", "datatype", "shape", "data"],
                "properties": {
                    "name": {"const": "images"},
                    "datatype": {"enum": list(datatypes)},
                    "shape": shape,
                    "data": {"type": "array", "items": data, "description": "The pixels, flat "
                             "or nested (row-major), as many as the shape says; integers for "
                             "UINT8"},
                    "parameters": {"type": "object"}}}},
            "outputs": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"enum": list(outputs)},
                               "parameters": {"type": "object",
                                              "properties": {"binary_data": flag}}}},
                "description": f"Outputs to return; without it: {list(outputs[:2])}."},
        },
    }


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in (
        (400, "Malformed JSON"), (401, "Missing API key"), (403, "Wrong API key"),
        (404, "Unknown model or version"), (413, "Body above ANOMALY_MAX_BODY_BYTES"),
        (415, "Unsupported content type"), (422, "Invalid images or options"),
        (503, "Model not loaded yet, or overloaded (see Retry-After)"))
}
V2_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": desc} for code, desc in (
        (400, "Invalid request"), (401, "Missing API key"), (403, "Wrong API key"),
        (404, "Unknown model or version"), (413, "Body above ANOMALY_MAX_BODY_BYTES"),
        (415, "Unsupported Content-Encoding"),
        (503, "Model not loaded yet, or overloaded (see Retry-After)"))
}


_SCORE_PATHS = ("/v1/models/{name}/score", "/v1/models/{name}/versions/{version}/score")
_INFER_PATHS = ("/v2/models/{model_name}/infer",
                "/v2/models/{model_name}/versions/{version}/infer")
_MULTIPART_TYPES = "image/png, image/jpeg, image/*, application/octet-stream"
V2_BINARY_NOTE = (
    "Binary tensor data extension: send the JSON header, then the raw little-endian tensor "
    "bytes, with the header `Inference-Header-Content-Length: <JSON length>` and "
    "`parameters.binary_data_size` on the input instead of `data`; outputs come back binary "
    "when they ask for `binary_data` (or `parameters.binary_data_output` is true). Bodies may "
    "be gzip/deflate-compressed (`Content-Encoding`).")


def _security_as_configured(doc: dict, settings) -> None:
    """Document the bearer keys only where this server asks for them: scoring routes only when
    ANOMALY_API_KEYS is set, admin routes unless they are opened (ANOMALY_ADMIN_OPEN=1 without
    an admin key)."""
    open_scoring = not settings.api_keys
    open_admin = not settings.admin_api_keys and settings.admin_open
    for item in doc["paths"].values():
        for op in item.values():
            names = {name for req in op.get("security", ()) for name in req}
            if ("scoringKey" in names and open_scoring) or ("adminKey" in names and open_admin):
                del op["security"]
                for code in ("401", "403"):
                    op.get("responses", {}).pop(code, None)


def _loaded_shapes(app) -> frozenset | None:
    from service.shapes import image_shape

    registry = getattr(app.state, "registry", None)
    if registry is None or not registry.snapshot.loaded:
        return None
    return frozenset(image_shape(m.detector) for e in registry.snapshot.models.values()
                     for m in e.versions.values())


def install_openapi(app, settings) -> None:
    """Make ``/openapi.json`` describe exactly what the routes accept.

    FastAPI's document is patched: the request bodies written by hand get their sub-schemas
    registered (no dangling ``$ref``), batch sizes take the configured limit, image arrays take
    the loaded models' shape (when they share one), multipart ``images`` must be files, and the
    V2 infer body is the strict schema of :func:`v2_request_schema`. Rebuilt when the loaded
    shapes change.
    """
    import copy

    _DTYPES, DEFAULT_OUTPUTS, OUTPUTS = V2_DTYPES, V2_DEFAULT_OUTPUTS, V2_OUTPUTS
    from service.shapes import pixel_shape, tensor_shapes

    base = app.openapi
    cache: dict = {}

    def openapi() -> dict:
        shapes = _loaded_shapes(app)
        key = shapes
        if key in cache:
            return cache[key]
        doc = copy.deepcopy(base())
        shape = next(iter(shapes)) if shapes and len(shapes) == 1 else None
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for path in doc["paths"].values():
            for op in path.values():
                for content in op.get("requestBody", {}).get("content", {}).values():
                    components.update(content.get("schema", {}).pop("$defs", {}))
        for p in _SCORE_PATHS:
            content = doc["paths"][p]["post"]["requestBody"]["content"]
            images = content["application/json"]["schema"]["properties"]["images"]
            images.update(items=image_schema(pixel_shape(shape) if shape else None),
                          minItems=1, maxItems=settings.max_batch_images)
            form = content["multipart/form-data"]
            form["schema"]["additionalProperties"] = False
            form["schema"]["properties"]["images"].update(minItems=1,
                                                          maxItems=settings.max_batch_images)
            form["encoding"] = {"images": {"contentType": _MULTIPART_TYPES}}
        for p in _INFER_PATHS:
            op = doc["paths"][p]["post"]
            schema = v2_request_schema(OUTPUTS, tuple(_DTYPES),
                                       tensor_shapes(shape) if shape else None,
                                       settings.max_batch_images)
            schema["properties"]["outputs"]["description"] = (
                f"Outputs to return; without it: {list(DEFAULT_OUTPUTS)}.")
            op["requestBody"] = {"required": True, "description": V2_BINARY_NOTE,
                                 "content": {"application/json": {"schema": schema}}}
        _security_as_configured(doc, settings)
        cache.clear()
        cache[key] = doc
        return doc

    app.openapi = openapi


def describe_version(model, *, default: bool) -> dict:
    """A :class:`~service.registry.LoadedModel` as :class:`VersionInfo` (``/v1/models``)."""
    det, meta, cal = model.detector, model.metadata, model.calibration
    return {
        "version": model.version,
        "default": default,
        "dataset": meta.get("dataset"),
        "normal_classes": meta.get("normal_classes"),
        "class_names": meta.get("class_names"),
        "model_type": meta.get("model_type", det.model),
        "image_shape": list(_image_shape(det)),
        "score": det.score,
        "aggregation": det.aggregation,
        "created_at": meta.get("created_at"),
        "artifact_sha256": model.sha256,
        "default_operating_point": cal.default,
        "operating_points": [
            {"name": p.name, "threshold": p.threshold, "method": p.method,
             "expected_fpr": p.expected_fpr,
             "fpr_interval": list(p.fpr_interval) if p.fpr_interval else None,
             "n_reference": p.n_reference, "expected_tpr": p.expected_tpr,
             "target_fpr": p.target_fpr}
            for p in cal.operating_points.values()],
        "metrics": det.metrics_,
        "loaded_at": model.loaded_at,
    }


def describe_model(entry) -> dict:
    """A :class:`~service.registry.ModelEntry` as :class:`ModelInfo` (``/v1/models``)."""
    from anomaly.artifact import version_key

    def newest_first(items):
        return sorted(items, key=lambda kv: version_key(kv[0]), reverse=True)

    return {
        "name": entry.name,
        "ready": entry.ready,
        "default_version": entry.default,
        "pinned_version": entry.pinned,
        "versions": [describe_version(m, default=v == entry.default)
                     for v, m in newest_first(entry.versions.items())],
        "available_versions": list(entry.available),
        "refused_versions": [{"version": v, "error": e}
                             for v, e in newest_first(entry.refused.items())],
    }


def _image_shape(detector) -> tuple[int, int, int]:
    from service.shapes import image_shape

    return image_shape(detector)
