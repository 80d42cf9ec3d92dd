"""The scoring path shared by the v1 and V2 routes: admit, queue for the model, count.

Results come from ``Detector.detect`` itself (scores, normalized scores, decisions at the
operating point, reconstructions), run in the registry's inference thread through the model's
micro-batcher, so they equal ``anomaly score`` on the same images; the service adds no scoring
logic of its own.

Load shedding: :class:`Admission` bounds the images in flight (decoded and waiting for, or in, a
model call). Over ``ANOMALY_MAX_QUEUED_IMAGES`` a scoring request gets 503 with ``Retry-After``
at once instead of queueing without limit, so an overloaded replica answers quickly and a load
balancer or client can retry elsewhere. CPU work of a request (parsing, validation, decoding,
encoding) runs in the app's CPU pool (:func:`off_loop`), so health checks and /metrics answer
while it runs; only a small request's (:func:`cpu_work`: at most :data:`INLINE_BYTES` of JSON, and of a
V2 binary tensor :data:`INLINE_BINARY_BYTES`; no images in the response) runs on the event
loop, where it costs less than the hand-off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi import Request

from service.batching import ShuttingDown
from service.errors import ServiceError, expect
from service.metrics import ServiceMetrics
from service.registry import LoadedModel

RETRY_AFTER_SECONDS = "1"


@dataclass
class Scored:
    """Results for one request's images (``n`` of them).

    Attributes:
        scores, normalized: ``(n,)`` float64; is_anomaly: ``(n,)`` bool.
        reconstruction, error_map: ``(n, *image)`` float32, when asked for.
    """

    model: LoadedModel
    operating_point: str
    threshold: float
    scores: np.ndarray
    normalized: np.ndarray
    is_anomaly: np.ndarray
    reconstruction: np.ndarray | None
    error_map: np.ndarray | None


class Admission:
    """A bounded count of the images admitted for scoring in this process.

    A scoring request holds a :meth:`ticket` from before its body is read until its response
    is built: one image while its body is read and decoded (its size is not known yet), then
    its real image count. So requests waiting for the CPU pool count too, and the whole queue
    (decode, model, encode) is bounded. Runs on the event loop only (no lock needed). A request
    that finds the service idle is admitted whatever its size, so a limit below the batch size
    never refuses everything.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.images = 0

    def _overloaded(self, n: int) -> ServiceError:
        return ServiceError(503, "overloaded", f"Expected at most {self.limit} images in "
                            f"flight (ANOMALY_MAX_QUEUED_IMAGES); retry after "
                            f"{RETRY_AFTER_SECONDS} s. Received: {n} more with {self.images} "
                            "in flight", headers={"Retry-After": RETRY_AFTER_SECONDS})

    @contextlib.contextmanager
    def ticket(self):
        """Admit a request (as one image) for the block, or refuse it with a 503 at once;
        yields a :class:`Ticket` to :meth:`~Ticket.resize` once its images are known."""
        if self.images >= self.limit:
            raise self._overloaded(1)
        ticket = Ticket(self)
        self.images += 1
        try:
            yield ticket
        finally:
            self.images -= ticket.held


class Ticket:
    """One admitted request's share of :class:`Admission`."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.held = 1

    def resize(self, n: int) -> None:
        """Hold ``n`` images instead; 503 when that goes over the limit (unless the request
        is alone)."""
        adm = self.admission
        extra = n - self.held
        if extra > 0 and adm.images > self.held and adm.images + extra > adm.limit:
            raise adm._overloaded(n)
        adm.images += extra
        self.held = n


async def off_loop(request: Request, fn: Callable, *args, **kwargs):
    """Run CPU-bound ``fn`` in the app's CPU pool so the event loop stays free."""
    pool = getattr(request.app.state, "cpu_pool", None)
    return await asyncio.get_running_loop().run_in_executor(
        pool, functools.partial(fn, *args, **kwargs))


#: Request bodies up to this size are parsed, and responses without images encoded, on the
#: event loop: for a single 28x28 image (about 3 KB of JSON) the two hand-offs to the CPU pool
#: and back cost more than the work (py-spy on the service at concurrency 8).
INLINE_BYTES = 16 * 1024
#: A V2 request whose JSON header is that small and whose binary tensor is at most this size is
#: handled on the loop too: the tensor is read with ``np.frombuffer`` and checked by vectorized
#: passes (about 0.1 ms for a 64-image 28x28 batch), less than the two hand-offs.
INLINE_BINARY_BYTES = 1 << 20


async def cpu_work(request: Request, small: bool, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the event loop when ``small``, else in the CPU pool
    (:func:`off_loop`)."""
    if small:
        return fn(*args, **kwargs)
    return await off_loop(request, fn, *args, **kwargs)


def operating_point(model: LoadedModel, name: str | None):
    """The named operating point of ``model`` (its default when ``None``); 422 when unknown."""
    cal = model.calibration
    if name is not None and name not in cal.operating_points:
        raise expect(f"an operating point of {model.name}/{model.version} in "
                     f"{sorted(cal.operating_points)}", repr(name[:100]),
                     code="unknown_operating_point")
    return cal.get(name)


async def score_images(metrics: ServiceMetrics, model: LoadedModel, x: np.ndarray,
                       operating_point_name: str | None, *, full: bool,
                       decode_s: float) -> Scored:
    """Score validated images ``(n, *image)`` float32 in [0, 1] with ``model``.

    Args:
        metrics: the app's metrics (stage times, batch sizes, scores).
        operating_point: a name of the model's calibration, or ``None`` for its default.
        full: also compute reconstructions and error maps.
        decode_s: seconds spent decoding the request, for the stage histogram.
    """
    op = operating_point(model, operating_point_name)  # unknown names fail before queueing
    try:
        res = await model.batcher.submit(x, key=op.name, full=full)
    except ShuttingDown:  # arrived while the server stops: another replica can answer it
        raise ServiceError(503, "shutting_down", "Expected a request before the server began "
                           f"to stop. Received: one for {model.name}/{model.version} after; "
                           f"retry after {RETRY_AFTER_SECONDS} s",
                           headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    out = res.output
    name = model.name
    stage = metrics.stage_duration
    metrics.child(stage, name, "decode").observe(decode_s)
    metrics.child(stage, name, "queue").observe(res.queue_s)
    metrics.child(stage, name, "predict").observe(res.predict_s)
    metrics.child(metrics.request_batch_size, name).observe(len(x))
    metrics.observe_scores(name, model.version, out.operating_point, out.scores,
                           int(np.count_nonzero(out.is_anomaly)))
    return Scored(model, out.operating_point, float(out.threshold), out.scores, out.normalized,
                  out.is_anomaly, out.reconstruction, out.error_map)


def png_base64(img: np.ndarray, *, scale_to_max: bool = False) -> str:
    """A ``(H, W)`` float image as a base64 grayscale PNG (values in [0, 1] -> 0..255)."""
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
