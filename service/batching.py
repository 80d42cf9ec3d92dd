"""Micro-batching: concurrent requests for one model version share one model call.

There is no timer and no added latency. A request that finds the model idle runs at once; the
requests that arrive while a call is running wait for it to finish and then run together, up
to ``max_images`` per call. Under load this turns many single-image calls into a few larger
ones (one graph execution each), which is where the throughput is on a CPU; alone, a request
pays only a thread hand-off.

When a call ends, its worker thread queues the next call (the requests that arrived
meanwhile) in the executor itself and hands the finished call's results to the event loop in
one callback. So the event loop is never between two model calls: under load on a small
machine it is busy parsing and encoding other requests' bodies, and a model waiting for the
loop to start its next call leaves cores idle. Queued in the executor, not run at once, the
next call takes its turn behind other models' calls that wait for the same threads.

A batcher has no long-lived thread or task, so nothing needs closing when a hot reload retires
its model: its worker returns when no request waits, and requests that already hold the old
model finish on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


class ShuttingDown(RuntimeError):
    """A request arrived after the batcher's executor was shut down (the server is stopping)."""


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
    loop: asyncio.AbstractEventLoop
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


def _settle(outcomes: list[tuple[asyncio.Future, object]]) -> None:
    """In the event loop: each future gets its result (or exception) unless its caller left."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class MicroBatcher:
    """Serializes the model calls of one model version and merges waiting requests.

    Only requests with the same ``key`` (the operating point) are merged, so one call answers
    each of them exactly as a call of its own would.

    Args:
        run: the model call, executed in ``executor`` (it must release the GIL while it works,
            as TensorFlow and onnxruntime do).
        executor: where model calls run; one of its workers at a time serves this batcher.
        max_images: most images merged into one call (a larger single request runs alone).
        enabled: ``False`` runs every request as its own call, still one at a time.
    """

    def __init__(self, run: RunFn, executor: Executor, *, max_images: int = 256,
                 enabled: bool = True):
        self._run = run
        self._executor = executor
        self._max_images = max_images
        self._enabled = enabled
        self._lock = threading.Lock()  # guards _pending and _working (loop and worker)
        self._pending: deque[_Job] = deque()
        self._working = False

    async def submit(self, x: np.ndarray, *, key: Hashable = None,
                     full: bool = False) -> BatchResult:
        """Run ``x`` ``(n, ...)`` float32 through the model call with ``key``; ``full`` also
        asks for reconstructions (a merged call computes them when any request wants them)."""
        loop = asyncio.get_running_loop()
        job = _Job(x, key, full, loop.create_future(), loop)
        with self._lock:
            self._pending.append(job)
            start, self._working = not self._working, True
        if start:
            self._start()
        return await job.future

    def _start(self) -> None:
        """Queue a worker in the executor (``_working`` is already set)."""
        try:
            self._executor.submit(self._work)
        except RuntimeError:  # the executor is shut down (the server is stopping)
            with self._lock:
                failed, self._pending, self._working = list(self._pending), deque(), False
            self._deliver(failed, [ShuttingDown("the model is shutting down")] * len(failed))

    def _take(self) -> list[_Job]:
        """The next call's requests (holding ``_lock``); callers that left are dropped."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        jobs = [first]
        if not self._enabled:
            return jobs
        total = len(first.x)
        rest: deque[_Job] = deque()
        while self._pending:  # the oldest requests of the same key join, the others wait
            job = self._pending.popleft()
            if job.future.done():
                continue
            if job.key == first.key and total + len(job.x) <= self._max_images:
                jobs.append(job)
                total += len(job.x)
            else:
                rest.append(job)
        self._pending = rest
        return jobs

    def _work(self) -> None:
        """In the executor: one model call for the oldest waiting requests. While more wait,
        the next call is queued behind whatever else waits for the executor's threads (other
        models' batchers share them), not behind the event loop."""
        with self._lock:
            jobs = self._take()
            if not jobs:
                self._working = False
                return
        try:
            outcomes = self._call(jobs)
        except BaseException as exc:  # not an Exception (those are outcomes): answer anyway
            self._deliver(jobs, [exc] * len(jobs))
            self._next()
            raise
        self._deliver(jobs, outcomes)
        self._next()

    def _next(self) -> None:
        with self._lock:
            self._working = bool(self._pending)
            more = self._working
        if more:
            self._start()

    def _call(self, jobs: list[_Job]) -> list[object]:
        """One model call for ``jobs``: each job's :class:`BatchResult`, or the call's error."""
        full = any(j.full for j in jobs)
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        start = time.perf_counter()
        try:
            out = self._run(x, jobs[0].key, full)
        except Exception as exc:  # the callers get it; the batcher stays usable
            return [exc] * len(jobs)
        predict_s = time.perf_counter() - start
        results: list[object] = []
        offset = 0
        for j in jobs:
            n = len(j.x)
            part = out if len(jobs) == 1 else _rows(out, slice(offset, offset + n), len(x))
            offset += n
            results.append(BatchResult(part, start - j.enqueued, predict_s, len(x)))
        return results

    @staticmethod
    def _deliver(jobs: list[_Job], outcomes: list[object]) -> None:
        """Hand ``outcomes`` to the jobs' event loops, one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for j, outcome in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(j.loop, []).append((j.future, outcome))
        for loop, outs in by_loop.items():
            # A closed loop has nobody waiting for these any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, outs)
