"""Label feedback from production: ``POST /v1/models/{name}/feedback`` (an admin route).

People who look at what a model flagged say whether it was right. Each record carries the image
(its pixels at the model's shape, 0-255) or the id of a scored image, and a label (``normal`` or
``anomaly``); the records are appended atomically to the feedback store beside the models
(:mod:`anomaly.feedback`: one JSON-lines file per UTC day, bounded size), and ``anomaly
calibrate ARTIFACT --feedback`` recalibrates on them. The route needs an admin key, like reload
(or ``ANOMALY_ADMIN_OPEN=1``); ``anomaly_feedback_records_total`` counts records by label.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from anomaly.errors import DataError
from service.deps import AdminAuth, MetricsDep, RegistryDep, SettingsDep, find_entry
from service.errors import ServiceError, parse_body
from service.schemas import ERROR_RESPONSES
from service.scoring import off_loop

router = APIRouter(prefix="/v1/models", tags=["admin"], dependencies=[AdminAuth],
                   responses=ERROR_RESPONSES)


class FeedbackRecord(BaseModel):
    """One label: an image (or the id of a scored one) and what it really was."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "anyOf": [{"required": ["id"]}, {"required": ["image"]}]})

    label: Literal["normal", "anomaly"]
    id: Annotated[str | None, Field(max_length=256)] = None
    image: list[Any] | None = Field(None, description="Pixels 0-255 of the model's image "
                                    "shape, as nested lists (H x W, or H x W x C)")
    time: str | float | None = Field(None, description="When the label was given: ISO-8601 "
                                     "with a time zone, or Unix seconds (default: now)")
    source: Annotated[str | None, Field(max_length=128)] = None

    @model_validator(mode="after")
    def _id_or_image(self):
        if self.id is None and self.image is None:
            raise ValueError("a record needs an id or an image")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"records": [{"id": "req-42/3", "label": "normal", "source": "on-call"}]}]})

    records: list[FeedbackRecord] = Field(..., min_length=1, max_length=1024)


class FeedbackReply(BaseModel):
    model: str
    stored: int
    labels: dict[str, int]


def _append(settings, name: str, records: list[dict]) -> list[dict]:
    from anomaly.feedback import FeedbackFullError, FeedbackStore

    try:
        return FeedbackStore(settings.models_dir).append(name, records)
    except FeedbackFullError as exc:
        raise ServiceError(507, "feedback_full", str(exc)) from None
    except DataError as exc:
        raise ServiceError(422, "invalid_feedback", str(exc)) from None


@router.post("/{name}/feedback", response_model=FeedbackReply, summary="Store label feedback",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 # The app's OpenAPI hook moves $defs into components/schemas.
                 "schema": FeedbackRequest.model_json_schema(
                     ref_template="#/components/schemas/{model}")}}}})
async def post_feedback(name: str, request: Request, registry: RegistryDep,
                        settings: SettingsDep, metrics: MetricsDep) -> dict:
    """Append labelled images (or ids of scored ones) for the model, durably."""
    find_entry(registry, name)  # 404 for a model the service does not know
    body = await request.body()
    parsed = await off_loop(request, parse_body, body, FeedbackRequest, "feedback body")
    records = [r.model_dump(exclude_none=True) for r in parsed.records]
    stored = await off_loop(request, _append, settings, name, records)
    labels: dict[str, int] = {}
    for r in stored:
        labels[r["label"]] = labels.get(r["label"], 0) + 1
    for label, n in labels.items():
        metrics.feedback_records.labels(name, label).inc(n)
    return {"model": name, "stored": len(stored), "labels": labels}
