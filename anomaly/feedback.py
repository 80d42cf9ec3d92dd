"""Label feedback stored beside the models: what people said about images a model scored.

Layout, under the models directory ``ROOT`` (the folder starts with ``_`` because the service
takes every other top-level folder for a model name)::

    ROOT/_feedback/.lock                    serializes writers (fcntl.flock)
    ROOT/_feedback/<model>/<YYYY-MM-DD>.jsonl   one JSON record a line, one file per UTC day

A record is ``{"id": str | None, "image": nested list | None, "label": "normal" | "anomaly",
"time": ISO-8601 UTC, "source": str, "received_at": ISO-8601 UTC}``; the file is chosen by
``received_at`` (the day the store got it), so files are only ever appended to.

Crash safety. An append validates every record first, then writes all of its complete lines
with one ``os.write`` on an ``O_APPEND`` descriptor and ``fsync``s before returning, holding
the store's lock. A crash can therefore leave at most one cut-off line at the end of a file:
readers skip a last line without its newline, and the next append (under the lock) truncates
it away before writing, so it can never glue itself to a later record. A write that fails in
the process (disk full, interrupt) is truncated back at once. A record is atomic; a batch is
not (after a crash, the complete lines of an unacknowledged batch may survive).

Size. The store refuses an append that would take the total size of all feedback files past
``max_bytes`` (:class:`FeedbackFullError`, HTTP 507), and a single record over
``max_record_bytes`` (:class:`~anomaly.errors.DataError`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from anomaly.errors import DataError, expected

LABELS = ("normal", "anomaly")
FOLDER = "_feedback"
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_MAX_RECORD_BYTES = 2**20
_KEYS = ("id", "image", "label", "time", "source")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_ID, _MAX_SOURCE, _MAX_SIDE = 256, 200, 4096


class FeedbackFullError(DataError):
    """The feedback store reached its size cap."""

    status_code = 507


def _utc_iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _model_name(model: object) -> str:
    if not isinstance(model, str) or not _MODEL.match(model):
        raise expected("a model name of letters, digits, '.', '_' or '-' (not starting with "
                       "'.', '_' or '-')", repr(model), cls=DataError)
    return model


def _time(i: int, value: object, now: _dt.datetime) -> str:
    if value is None:
        return _utc_iso(now)
    what = f"record {i}'s time as ISO 8601 with a time zone or Unix seconds"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise expected(what, repr(value), cls=DataError)
        try:
            return _utc_iso(_dt.datetime.fromtimestamp(float(value), _dt.UTC))
        except (OverflowError, OSError, ValueError):
            raise expected(what, repr(value), cls=DataError) from None
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise expected(what, repr(value)[:80], cls=DataError) from None
    if not isinstance(value, _dt.datetime) or value.tzinfo is None:
        # A naive time could be any zone; guessing would misfile it by hours.
        raise expected(what, repr(value)[:80], cls=DataError)
    return _utc_iso(value)


def _image(i: int, value: object) -> list:
    what = f"record {i}'s image as a (H, W) or (H, W, C) array of pixels in 0-255"
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise expected(what, type(value).__name__, cls=DataError) from None
    if arr.dtype.kind not in "iuf":
        raise expected(what, f"dtype {arr.dtype}", cls=DataError)
    if arr.ndim not in (2, 3) or arr.size == 0 or max(arr.shape) > _MAX_SIDE \
            or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise expected(what, f"shape {arr.shape}", cls=DataError)
    if not np.isfinite(arr).all():
        raise expected(what, "NaN or Inf", cls=DataError)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255:
        raise expected(what, f"values from {lo:g} to {hi:g}", cls=DataError)
    return arr.tolist()


def _text(i: int, key: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        received = f"{len(value)} characters" if isinstance(value, str) and value.strip() \
            else repr(value)[:80]
        raise expected(f"record {i}'s {key} as a non-empty string of at most {limit} "
                       "characters", received, cls=DataError)
    return value


def validate_record(i: int, record: object, now: _dt.datetime) -> dict:
    """One caller's record -> the stored form (see the module docstring); ``i`` names it."""
    if not isinstance(record, Mapping):
        raise expected(f"record {i} as an object with keys {list(_KEYS)}",
                       type(record).__name__, cls=DataError)
    unknown = sorted(str(k) for k in record if k not in _KEYS)
    if unknown:
        raise expected(f"record {i}'s keys among {list(_KEYS)}", unknown, cls=DataError)
    rid, image = record.get("id"), record.get("image")
    if rid is None and image is None:
        raise expected(f"record {i} to have an id or an image", "neither", cls=DataError)
    if isinstance(rid, numbers.Integral) and not isinstance(rid, bool):
        rid = str(int(rid))
    if rid is not None:
        rid = _text(i, "id", rid, _MAX_ID)
    label = record.get("label")
    if label not in LABELS:
        raise expected(f"record {i}'s label in {list(LABELS)}", repr(label)[:80],
                       cls=DataError)
    source = record.get("source")
    return {
        "id": rid,
        "image": None if image is None else _image(i, image),
        "label": label,
        "time": _time(i, record.get("time"), now),
        "source": "unknown" if source is None else _text(i, "source", source, _MAX_SOURCE),
        "received_at": _utc_iso(now),
    }


class FeedbackStore:
    """Append-only label feedback per model under ``root/_feedback/`` (module docstring).

    Args:
        root: the models directory.
        max_bytes: cap on the total size of all feedback files.
        max_record_bytes: cap on one record's JSON line.
        clock: returns the current time (timezone-aware); for tests.
    """

    def __init__(self, root: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 clock: Callable[[], _dt.datetime] | None = None) -> None:
        self.root = Path(root)
        self.folder = self.root / FOLDER
        self.max_bytes = int(max_bytes)
        self.max_record_bytes = int(max_record_bytes)
        self._clock = clock or (lambda: _dt.datetime.now(_dt.UTC))

    def path(self, model: str) -> Path:
        """The folder of ``model``'s day files."""
        return self.folder / _model_name(model)

    def models(self) -> list[str]:
        """Names of the models with feedback, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and _MODEL.match(p.name))

    def size(self) -> int:
        """Total bytes of all feedback files (what ``max_bytes`` caps)."""
        if not self.folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.folder.glob("*/*.jsonl"))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, model: str, records: Mapping | Sequence[Mapping]) -> list[dict]:
        """Validate and durably append records for ``model``.

        Args:
            model: the model's name (as in ``ROOT/NAME/VERSION``).
            records: one record or a list of them: ``{"id" and/or "image", "label", "time"
                (optional, default now), "source" (optional)}``; an image is ``(H, W)`` or
                ``(H, W, C)`` pixels in 0-255.

        Returns:
            The records as stored.

        Raises:
            DataError: a bad model name or record (nothing is written).
            FeedbackFullError: the store would grow past ``max_bytes`` (nothing is written).
        """
        name = _model_name(model)
        if isinstance(records, Mapping):
            records = [records]
        if isinstance(records, str | bytes) or not isinstance(records, Sequence) or not records:
            raise expected("a non-empty list of feedback records",
                           repr(records)[:80] if isinstance(records, Sequence)
                           else type(records).__name__, cls=DataError)
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the feedback clock must return timezone-aware times")
        stored = [validate_record(i, r, now) for i, r in enumerate(records)]
        lines = [json.dumps(r, separators=(",", ":"), allow_nan=False).encode() + b"\n"
                 for r in stored]
        for i, line in enumerate(lines):
            if len(line) > self.max_record_bytes:
                raise expected(f"record {i} of at most {self.max_record_bytes} bytes as JSON",
                               f"{len(line)} bytes", cls=DataError)
        data = b"".join(lines)
        with self._lock():
            total = self.size()
            if total + len(data) > self.max_bytes:
                raise expected(f"feedback within the store's cap of {self.max_bytes} bytes",
                               f"{total} bytes stored + {len(data)} new",
                               hint=f"Move old day files out of {self.folder} or raise "
                                    "max_bytes", cls=FeedbackFullError)
            folder = self.folder / name
            new_folder = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{now.astimezone(_dt.UTC):%Y-%m-%d}.jsonl"
            new_file = not path.exists()
            _append(path, data)
            # A new name lives in its directory: without syncing that, a crash can lose a
            # whole acknowledged file.
            if new_file:
                _fsync_dir(folder)
            if new_folder:
                _fsync_dir(self.folder)
        return stored

    def read(self, model: str, *, errors: str = "raise") -> Iterator[dict]:
        """Yield ``model``'s records, oldest day first, in the order they were appended.

        A last line without its newline (a write cut off by a crash, or one in progress) is
        skipped. A complete line that is not a JSON object means the file was damaged outside
        this store: a DataError naming the file and line, or skipped with ``errors="skip"``.
        """
        if errors not in ("raise", "skip"):
            raise expected("errors='raise' or 'skip'", repr(errors), cls=DataError)
        folder = self.path(model)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.jsonl")):
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        rec = None
                    if isinstance(rec, dict):
                        yield rec
                    elif errors == "raise":
                        raise expected("one JSON record a line", f"a damaged line in "
                                       f"{path}:{number}", cls=DataError)


def _append(path: Path, data: bytes) -> None:
    """Append complete lines with one write; drop a cut-off last line first (under the lock)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A crash cut the last record short before it was acknowledged: drop it, or the
            # next record would be glued onto it.
            size = _last_newline_end(fd, size)
            os.ftruncate(fd, size)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _last_newline_end(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the file's last newline (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
