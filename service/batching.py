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
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchResult:
    """One request's part of a model call.

    Attributes:
        scores: ``(n,)`` float64 anomaly scores.
        reconstruction, error_map: ``(n, 28, 28)`` float32, when the call computed them.
        queue_s: seconds the request waited for the model; predict_s: the call's duration.
        batch_images: images in the call the request ran in.
    """

    scores: np.ndarray
    reconstruction: np.ndarray | None
    error_map: np.ndarray | None
    queue_s: float
    predict_s: float
    batch_images: int


@dataclass
class _Job:
    x: np.ndarray
    full: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


#: ``run(x, full)`` -> ``(scores, reconstruction | None, error_map | None)``.
RunFn = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


class MicroBatcher:
    """Serializes the model calls of one model version and merges waiting requests.

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

    async def submit(self, x: np.ndarray, *, full: bool = False) -> BatchResult:
        """Score ``x`` ``(n, 28, 28)`` float32; ``full`` also returns reconstructions."""
        loop = asyncio.get_running_loop()
        job = _Job(x, full, loop.create_future())
        self._pending.append(job)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await job.future

    def _take(self) -> list[_Job]:
        jobs = [self._pending.popleft()]
        if not self._enabled:
            return jobs
        total = len(jobs[0].x)
        while self._pending and total + len(self._pending[0].x) <= self._max_images:
            job = self._pending.popleft()
            jobs.append(job)
            total += len(job.x)
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
                    scores, recon, err = await loop.run_in_executor(
                        self._executor, self._run, x, full)
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
                    j.future.set_result(BatchResult(
                        scores[sl], recon[sl] if recon is not None else None,
                        err[sl] if err is not None else None, start - j.enqueued, predict_s,
                        len(x)))
        finally:
            self._task = None
            if self._pending:  # cancelled mid-way: the waiting callers must not hang
                for j in self._pending:
                    j.future.cancel()
                self._pending.clear()
