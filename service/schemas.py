"""Request and response models (pydantic), which also make the OpenAPI docs at /docs.

``images`` is validated only shallowly by pydantic (a list); each image is then checked by
:mod:`service.inputs`, which can name the image and the reason (shape, range, NaN, base64, ...)
in one readable error instead of one pydantic error per pixel, and is several times faster on
a 64-image batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

ImageFormat = Literal["array", "png", "both"]

_IMAGE_SCHEMA = {
    "oneOf": [
        {"type": "array", "minItems": 28, "maxItems": 28, "description": "28 rows",
         "items": {"type": "array", "minItems": 28, "maxItems": 28,
                   "items": {"type": "number", "minimum": 0, "maximum": 255}}},
        {"type": "string", "description": "base64-encoded PNG/JPEG (a data: URL is accepted)"},
    ]
}


class ScoreOptions(BaseModel):
    """Options of a score request (JSON body fields, form fields or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    operating_point: str | None = Field(
        None, description="Operating point name, e.g. 'fpr@1%'; the model's default if omitted.")
    return_reconstruction: bool = Field(False, description="Include each reconstruction.")
    return_error_map: bool = Field(False, description="Include each per-pixel error map.")
    image_format: ImageFormat = Field(
        "array", description="How reconstructions and error maps are returned: 'array' (28x28 "
        "floats), 'png' (base64 PNG; error maps scaled so the image's largest error is white) "
        "or 'both'.")


class ScoreRequest(ScoreOptions):
    """``POST /v1/models/{name}/score`` JSON body."""

    images: Annotated[list[Any], WithJsonSchema({"type": "array", "items": _IMAGE_SCHEMA})] = (
        Field(..., description="Images: each a 28x28 nested list of pixel values (all-integer "
              "images are 0-255; images with any float are [0, 1] unless a value exceeds 1, "
              "then 0-255; decided per image) or a base64-encoded PNG/JPEG string."))

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": [[[0] * 28] * 28], "operating_point": "fpr@1%",
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
    expected_fpr: float
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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in (
        (400, "Malformed JSON"), (401, "Missing API key"), (403, "Wrong API key"),
        (404, "Unknown model or version"), (413, "Body above ANOMALY_MAX_BODY_BYTES"),
        (415, "Unsupported content type"), (422, "Invalid images or options"),
        (503, "Model not loaded yet"))
}
V2_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": desc} for code, desc in (
        (400, "Invalid request"), (401, "Missing API key"), (403, "Wrong API key"),
        (404, "Unknown model or version"), (413, "Body above ANOMALY_MAX_BODY_BYTES"),
        (503, "Model not loaded yet"))
}
