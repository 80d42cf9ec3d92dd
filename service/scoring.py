"""The scoring path shared by the v1 and V2 routes: queue for the model, decide, count.

Scores come from the artifact's compiled scorer (``Detector.scorer``, one graph execution per
model call, no ``model.predict``), run in the registry's inference thread through the model's
micro-batcher; normalized scores and decisions use the artifact's calibration exactly as
``Detector.detect`` does, so they equal ``anomaly score`` on the same images.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.registry import LoadedModel


@dataclass
class Scored:
    """Results for one request's images."""

    model: LoadedModel
    operating_point: str
    threshold: float
    scores: np.ndarray
    normalized: np.ndarray
    is_anomaly: np.ndarray
    reconstruction: np.ndarray | None
    error_map: np.ndarray | None


async def score_images(model: LoadedModel, x: np.ndarray, operating_point: str | None, *,
                       full: bool, decode_s: float) -> Scored:
    """Score validated images ``(n, 28, 28)`` float32 in [0, 1] with ``model``.

    Args:
        operating_point: a name of the model's calibration, or ``None`` for its default.
        full: also compute reconstructions and error maps.
        decode_s: seconds spent decoding the request, for the stage histogram.
    """
    op = model.operating_point(operating_point)  # unknown names fail before queueing
    res = await model.batcher.submit(x, full=full)
    scores = res.scores
    flagged = scores > op.threshold
    normalized = model.calibration.normalize(scores)
    name = model.name
    metrics.STAGE_DURATION.labels(name, "decode").observe(decode_s)
    metrics.STAGE_DURATION.labels(name, "queue").observe(res.queue_s)
    metrics.STAGE_DURATION.labels(name, "predict").observe(res.predict_s)
    metrics.REQUEST_BATCH_SIZE.labels(name).observe(len(x))
    metrics.observe_scores(name, model.version, op.name, scores, int(flagged.sum()))
    return Scored(model, op.name, float(op.threshold), scores, normalized, flagged,
                  res.reconstruction, res.error_map)


def png_base64(img: np.ndarray, *, scale_to_max: bool = False) -> str:
    """A ``(28, 28)`` float image as a base64 grayscale PNG (values in [0, 1] -> 0..255)."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float32)
    if scale_to_max:
        top = float(a.max())
        a = a / top if top > 0 else a
    u8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_v1(s: Scored, *, reconstruction: bool, error_map: bool, image_format: str) -> bytes:
    """The JSON body of a v1 score response (built directly: no per-field pydantic pass)."""
    arrays = image_format in ("array", "both")
    pngs = image_format in ("png", "both")
    results = []
    for i, (score, norm, flag) in enumerate(zip(s.scores.tolist(), s.normalized.tolist(),
                                                s.is_anomaly.tolist(), strict=True)):
        r = {"index": i, "score": score, "normalized_score": norm, "is_anomaly": flag}
        if reconstruction:
            if arrays:
                r["reconstruction"] = s.reconstruction[i].tolist()
            if pngs:
                r["reconstruction_png"] = png_base64(s.reconstruction[i])
        if error_map:
            if arrays:
                r["error_map"] = s.error_map[i].tolist()
            if pngs:
                r["error_map_png"] = png_base64(s.error_map[i], scale_to_max=True)
        results.append(r)
    body = {"model": s.model.name, "version": s.model.version,
            "operating_point": s.operating_point, "threshold": s.threshold, "results": results}
    return json.dumps(body, allow_nan=False).encode()
