"""v1 model information and scoring.

``POST /v1/models/{name}/score`` takes either a JSON body (:class:`~service.schemas.ScoreRequest`)
or a ``multipart/form-data`` upload of image files in fields named ``images`` (options as form
fields). Options can also be given as query parameters; a value in the body wins.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service import inputs
from service.deps import RegistryDep, Scoring, ScoringAuth, ScoringDep, find_entry, find_model
from service.errors import ServiceError, describe_pydantic_error, expect, parse_body
from service.schemas import (
    ERROR_RESPONSES,
    ModelInfo,
    ModelList,
    ScoreOptions,
    ScoreRequest,
    ScoreResponse,
    VersionInfo,
    describe_model,
    describe_version,
)
from service.scoring import INLINE_BYTES, cpu_work, encode_v1, off_loop, score_images
from service.shapes import image_shape

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[ScoringAuth],
                   responses=ERROR_RESPONSES)

_OPTION_FIELDS = tuple(ScoreOptions.model_fields)
_SCORE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": ScoreRequest.model_json_schema(
            ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "PNG/JPEG files (any size: converted to grayscale "
                           "and resized to the model's image shape)"},
                "operating_point": {"type": "string"},
                "return_reconstruction": {"type": "boolean"},
                "return_error_map": {"type": "boolean"},
                "image_format": {"type": "string", "enum": ["array", "png", "both"]},
            }}},
    },
}


@router.get("", response_model=ModelList, summary="List models")
async def list_models(registry: RegistryDep) -> dict:
    """Every model in the directory: loaded versions (with data set, normal classes, model
    type, operating points, evaluation metrics, artifact hash), available and refused ones."""
    snap = registry.snapshot
    return {"models": [describe_model(e) for _, e in sorted(snap.models.items())],
            "problems": list(snap.problems)}


@router.get("/{name}", response_model=ModelInfo, summary="Describe a model")
async def get_model(name: str, registry: RegistryDep) -> dict:
    """One model, as in the list."""
    return describe_model(find_entry(registry, name))


@router.get("/{name}/versions/{version}", response_model=VersionInfo,
            summary="Describe a model version")
async def get_version(name: str, version: str, registry: RegistryDep) -> dict:
    """One loaded version of a model."""
    entry = find_entry(registry, name)
    return describe_version(find_model(registry, name, version), default=version == entry.default)


def _query_parameters() -> list[dict]:
    props = ScoreOptions.model_json_schema()["properties"]
    return [{"name": k, "in": "query", "required": False, "description": props[k]["description"],
             "schema": {key: v for key, v in props[k].items() if key not in ("description",
                                                                               "default")}}
            for k in _OPTION_FIELDS]


# The options are read off the query string by the route rather than declared as FastAPI
# ``Query`` parameters: FastAPI validates each declared parameter on every request (~30 us for
# the four, as much as the rest of the routing), and the body's options are validated by
# ScoreOptions anyway. They are documented in the OpenAPI operation all the same.
_SCORE_OPENAPI = {"requestBody": _SCORE_BODY, "parameters": _query_parameters()}


def _query_options(request: Request) -> dict:
    """The score options given as query parameters, validated (422 naming ``query.FIELD``)."""
    params = request.query_params
    if not params:
        return {}
    given = {k: params[k] for k in _OPTION_FIELDS if k in params}
    try:
        return ScoreOptions.model_validate(given).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        err["loc"] = ("query", *err.get("loc", ()))
        raise ServiceError(422, "validation_error", describe_pydantic_error(err)) from None


@router.post("/{name}/score", response_model=ScoreResponse, summary="Score images",
             openapi_extra=_SCORE_OPENAPI)
async def score(name: str, request: Request, ctx: ScoringDep) -> Response:
    """Score images with the model's default version (newest, or pinned)."""
    query = _query_options(request)  # a bad option is a 422 before the model is looked up
    return await _score(request, find_model(ctx.registry, name), ctx, query)


@router.post("/{name}/versions/{version}/score", response_model=ScoreResponse,
             summary="Score images with a version", openapi_extra=_SCORE_OPENAPI)
async def score_version(name: str, version: str, request: Request, ctx: ScoringDep) -> Response:
    """Score images with a named loaded version."""
    query = _query_options(request)
    return await _score(request, find_model(ctx.registry, name, version), ctx, query)


async def _score(request: Request, model, ctx: Scoring, query: dict) -> Response:
    # Full: refused before the body is read (or paid for).
    with request.app.state.admission.ticket() as ticket:
        return await _score_admitted(request, model, ctx.settings, ctx.metrics, query, ticket)


async def _score_admitted(request: Request, model, settings, metrics, query: dict,
                          ticket) -> Response:
    start = time.perf_counter()
    shape = image_shape(model.detector)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        body = await request.body()
        small = len(body) <= INLINE_BYTES
        if small:
            req, options = _parse_json(body, settings, query)
            # An encoded (PNG/JPEG) image may decode to far more pixels than its bytes: never
            # on the loop.
            x = await cpu_work(request, all(type(i) is list for i in req.images), _decode_json,
                               req, settings, shape)
        else:
            x, options = await off_loop(request, _parse_and_decode_json, body, settings, query,
                                        shape)
    elif media_type == "multipart/form-data":
        small = False
        files, options = await _read_form(request, settings, query)
        x = await off_loop(request, inputs.decode_files, files, shape=shape,
                           max_images=settings.max_batch_images,
                           max_pixels=settings.max_image_pixels,
                           max_request_pixels=settings.max_request_pixels)
    else:
        raise expect("Content-Type application/json or multipart/form-data",
                     preview_media_type(media_type), code="unsupported_media_type",
                     status_code=415)
    decoded = time.perf_counter()
    full = options.return_reconstruction or options.return_error_map
    ticket.resize(len(x))
    scored = await score_images(metrics, model, x, options.operating_point, full=full,
                                decode_s=decoded - start)
    encode_start = time.perf_counter()
    body = await cpu_work(request, small and not full, encode_v1, scored,
                          reconstruction=options.return_reconstruction,
                          error_map=options.return_error_map, image_format=options.image_format)
    metrics.child(metrics.stage_duration, model.name, "encode").observe(
        time.perf_counter() - encode_start)
    return Response(body, media_type="application/json")


def preview_media_type(media_type: str) -> str:
    if not media_type:
        return "no Content-Type"
    return repr(media_type[:60] + ("..." if len(media_type) > 60 else ""))


def _options(query: dict, given: dict) -> ScoreOptions:
    merged = {k: v for k, v in query.items() if v is not None}
    merged.update(given)
    try:
        return ScoreOptions.model_validate(merged)
    except ValidationError as exc:
        raise ServiceError(422, "validation_error",
                           describe_pydantic_error(exc.errors(include_url=False)[0])) from None


def _parse_json(body: bytes, settings, query: dict) -> tuple[ScoreRequest, ScoreOptions]:
    """Body -> (request, options), the images not decoded yet; CPU-bound for large bodies."""
    req = parse_body(body, ScoreRequest, 'body like {"images": [...]}',
                     max_depth=settings.max_json_depth, max_keys=settings.max_json_keys)
    options = _options(query, {k: getattr(req, k) for k in req.model_fields_set
                               if k in _OPTION_FIELDS})
    return req, options


def _decode_json(req: ScoreRequest, settings, shape) -> np.ndarray:
    return inputs.decode_json_images(req.images, shape=shape,
                                     max_images=settings.max_batch_images,
                                     max_pixels=settings.max_image_pixels,
                                     max_request_pixels=settings.max_request_pixels)


def _parse_and_decode_json(body: bytes, settings, query: dict, shape):
    """Body -> (images, options) in one call: one hand-off to the CPU pool."""
    fast = inputs.integer_json_batch(body, shape, max_images=settings.max_batch_images,
                                     max_depth=settings.max_json_depth)
    if fast is not None:
        pixels, rest = fast
        # A rest that fails is parsed again whole, so the error (and where it says the body
        # broke) is the one the whole body gets.
        with contextlib.suppress(ServiceError):
            _, options = _parse_json(rest, settings, query)
            return inputs.validated(pixels, "'images'"), options
    req, options = _parse_json(body, settings, query)
    return _decode_json(req, settings, shape), options


async def _read_form(request: Request, settings, query: dict):
    try:
        form = await request.form(max_files=settings.max_batch_images * 4, max_fields=32)
    except ServiceError:
        raise  # the body limit
    except Exception as exc:  # malformed multipart of any kind is the client's
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise expect("a valid multipart/form-data body", str(detail)[:200],
                     code="invalid_multipart", status_code=400) from None
    try:
        files: list[tuple[str, bytes]] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise expect("image files in fields named 'images'",
                                 f"a file in the field {key[:40]!r}", code="validation_error")
                files.append((value.filename or "upload", await value.read()))
            elif key == "images":
                raise expect("the 'images' fields to be files (a filename in their "
                             "Content-Disposition)", "a plain text field 'images'",
                             code="validation_error")
            elif key in _OPTION_FIELDS:
                fields[key] = value
            else:
                raise expect(f"form fields 'images' (files) and {list(_OPTION_FIELDS)}",
                             f"the field {key[:40]!r}", code="validation_error")
    finally:
        await form.close()
    return files, _options(query, fields)
