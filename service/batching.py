"""Micro-batching: concurrent requests for one model version share one model call.

There is no timer and no added latency. A request that finds the model idle runs at once; the
requests that arrive while a call is running wait for it to finish and then run together, up
to ``max_images`` per call. Under load this turns many single-image calls into a few larger
ones (one graph execution each), which is where the throughput is on a CPU; alone, a request
pays only a thread hand-off.

A batcher has no long-lived task, so nothing needs closing when a hot reload retires its model:
requests that already hold the old model finish on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchResult:
    """One request's part of a model call.

    Attributes:
        output: the call's result (``Detector.detect``'s ``DetectorOutput``) cut to the
            request's ``n`` images: every array field of length N in the call becomes ``(n, ...)``.
        queue_s: seconds the request waited for the model; predict_s: the call's duration.
        batch_images: images in the call the request ran in.
    """

    output: object
    queue_s: float
    predict_s: float
    batch_images: int


@dataclass
class _Job:
    x: np.ndarray
    key: Hashable
    full: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


#: ``run(x, key, full)`` -> a dataclass whose array fields have one row per image of ``x``
#: (``Detector.detect`` at the operating point ``key``, reconstructions when ``full``).
RunFn = Callable[[np.ndarray, Hashable, bool], object]


def _rows(out, sl: slice, total: int):
    """``out`` (a dataclass) with each of its per-image array fields cut to ``sl``."""
    changes = {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, np.ndarray) and value.ndim and len(value) == total:
            changes[f.name] = value[sl]
    return dataclasses.replace(out, **changes)


class MicroBatcher:
    """Serializes the model calls of one model version and merges waiting requests.

    Only requests with the same ``key`` (the operating point) are merged, so one call answers
    each of them exactly as a call of its own would.

    Args:
        run: the model call, executed in ``executor`` (it must release the GIL while it works,
            as TensorFlow does).
        executor: where model calls run.
        max_images: most images merged into one call (a larger single request runs alone).
        enabled: ``False`` runs every request as its own call, still one at a time.
    """

    def __init__(self, run: RunFn, executor: Executor, *, max_images: int = 256,
                 enabled: bool = True):
        self._run = run
        self._executor = executor
        self._max_images = max_images
        self._enabled = enabled
        self._pending: deque[_Job] = deque()
        self._task: asyncio.Task | None = None

    async def submit(self, x: np.ndarray, *, key: Hashable = None,
                     full: bool = False) -> BatchResult:
        """Run ``x`` ``(n, ...)`` float32 through the model call with ``key``; ``full`` also
        asks for reconstructions (a merged call computes them when any request wants them)."""
        loop = asyncio.get_running_loop()
        job = _Job(x, key, full, loop.create_future())
        self._pending.append(job)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await job.future

    def _take(self) -> list[_Job]:
        first = self._pending.popleft()
        jobs = [first]
        if not self._enabled:
            return jobs
        total = len(first.x)
        rest: deque[_Job] = deque()
        while self._pending:  # the oldest requests of the same key join, the others wait
            job = self._pending.popleft()
            if job.key == first.key and total + len(job.x) <= self._max_images:
                jobs.append(job)
                total += len(job.x)
            else:
                rest.append(job)
        self._pending = rest
        return jobs

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                jobs = [j for j in self._take() if not j.future.done()]  # skip cancelled
                if not jobs:
                    continue
                full = any(j.full for j in jobs)
                x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
                start = time.perf_counter()
                try:
                    out = await loop.run_in_executor(self._executor, self._run, x, jobs[0].key,
                                                     full)
                except asyncio.CancelledError:
                    for j in jobs:
                        j.future.cancel()
                    raise
                except Exception as exc:  # the callers get it; the batcher stays usable
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(exc)
                    continue
                predict_s = time.perf_counter() - start
                offset = 0
                for j in jobs:
                    n = len(j.x)
                    sl = slice(offset, offset + n)
                    offset += n
                    if j.future.done():
                        continue
                    part = out if len(jobs) == 1 else _rows(out, sl, len(x))
                    j.future.set_result(BatchResult(part, start - j.enqueued, predict_s,
                                                    len(x)))
        finally:
            self._task = None
            if self._pending:  # cancelled mid-way: the waiting callers must not hang
                for j in self._pending:
                    j.future.cancel()
                self._pending.clear()
