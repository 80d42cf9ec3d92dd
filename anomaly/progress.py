"""Progress on stderr: a bar on a terminal, plain lines in logs, nothing when quiet.

One verbosity for the whole process, set by the CLI's ``-q``/``-v`` (:func:`set_verbosity`):
0 quiet (errors only), 1 normal (status lines, progress, notes), 2 verbose (also per-epoch
lines with every metric, and debug notes). The library defaults to 1, so the Python API
reports progress like the CLI does.

A step shows a bar only when stderr is a terminal (``rich``), and only once it has run for
:data:`SHOW_AFTER_S` seconds, so quick steps stay silent. Elsewhere (CI logs, pipes) it prints
a plain line at most every :data:`PLAIN_EVERY_S` seconds and one final line if the step took
longer than :data:`SHOW_AFTER_S`: a log gets a heartbeat, never a carriage-return mess.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

QUIET, NORMAL, VERBOSE = 0, 1, 2
SHOW_AFTER_S = 2.0
PLAIN_EVERY_S = 10.0

_verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """0 quiet, 1 normal, 2 verbose (see the module docstring)."""
    global _verbosity
    _verbosity = int(level)


def verbosity() -> int:
    return _verbosity


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def status(msg: str, *, level: int = NORMAL) -> None:
    """One line on stderr at ``level`` or above."""
    if _verbosity >= level:
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """A counter of ``total`` units of work named ``desc``; see :func:`progress`."""

    def __init__(self, desc: str, total: float | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0.0
        self.t0 = time.perf_counter()
        self._last_line = self.t0
        self._bar = None
        self._task = None
        self._enabled = _verbosity >= NORMAL
        self._tty = self._enabled and is_tty()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = [TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn() if self.total else TextColumn(""),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.desc, total=self.total, completed=self.done)

    def update(self, n: float = 1, *, total: float | None = None) -> None:
        """Count ``n`` more units done (``total`` may arrive late, e.g. with a download)."""
        self.done += n
        if total is not None:
            self.total = total
        if not self._enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if self._bar is None and now - self.t0 >= SHOW_AFTER_S:
                self._start_bar()
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, total=self.total)
        elif now - self.t0 >= SHOW_AFTER_S and now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            print(f"{self.desc}: {self._count()} ({now - self.t0:.0f} s)", file=sys.stderr,
                  flush=True)

    def _count(self) -> str:
        def fmt(v: float) -> str:
            return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"

        if self.total:
            return f"{fmt(self.done)}/{fmt(self.total)} {self.unit} ({self.done / self.total:.0%})"
        return f"{fmt(self.done)} {self.unit}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elapsed = time.perf_counter() - self.t0
        if self._enabled and elapsed >= SHOW_AFTER_S:
            print(f"{self.desc}: {self._count()} in {elapsed:.1f} s", file=sys.stderr,
                  flush=True)


@contextlib.contextmanager
def progress(desc: str, total: float | None = None, unit: str = "images"
             ) -> Iterator[Progress]:
    """``with progress("Scoring", total=n) as p: ... p.update(k)``: see the module docstring."""
    p = Progress(desc, total, unit)
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def step(desc: str) -> Iterator[None]:
    """A step with no count (a report, a model load): a spinner on a terminal after
    :data:`SHOW_AFTER_S`, a final ``desc: done in X s`` line when it took longer."""
    t0 = time.perf_counter()
    spinner = None
    if _verbosity >= NORMAL and is_tty():
        from rich.console import Console

        spinner = Console(file=sys.stderr).status(desc)
        spinner.start()
    try:
        yield
    finally:
        if spinner is not None:
            spinner.stop()
        elapsed = time.perf_counter() - t0
        if _verbosity >= NORMAL and elapsed >= SHOW_AFTER_S:
            print(f"{desc}: done in {elapsed:.1f} s", file=sys.stderr, flush=True)


#: Images per chunk when a long scoring run is split up to report progress. A score does not
#: depend on the rest of its batch, so chunking changes no result.
CHUNK = 2048


def in_chunks(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, desc: str
              ) -> np.ndarray:
    """``fn(x)`` computed chunk by chunk with progress; ``fn`` maps ``(n, ...)`` to ``(n,)``.

    Args:
        fn: e.g. ``Detector.decision_function``.
        x: images ``(N, H, W[, C])``.

    Returns:
        The concatenated results ``(N,)``.
    """
    if len(x) <= CHUNK:
        return fn(x)
    parts = []
    with progress(desc, total=len(x)) as p:
        for start in range(0, len(x), CHUNK):
            parts.append(fn(x[start : start + CHUNK]))
            p.update(len(parts[-1]))
    return np.concatenate(parts)
