"""Label feedback store: durable appends, crash recovery, the size cap, clear errors."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from anomaly import feedback
from anomaly.errors import DataError
from anomaly.feedback import FeedbackFullError, FeedbackStore

T0 = dt.datetime(2026, 12, 1, 23, 59, 59, tzinfo=dt.UTC)


class Clock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def _store(tmp_path: Path, **kwargs) -> FeedbackStore:
    return FeedbackStore(tmp_path, clock=Clock(), **kwargs)


def test_append_and_read_back_one_file_per_utc_day(tmp_path):
    clock = Clock()
    store = FeedbackStore(tmp_path, clock=clock)
    image = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    out = store.append("mnist-0", [
        {"id": "a1", "label": "normal", "source": "ui"},
        {"image": image, "label": "anomaly", "time": "2026-12-01T20:00:00+02:00"},
    ])
    assert out[1]["time"] == "2026-12-01T18:00:00.000000Z"  # converted to UTC
    assert out[1]["source"] == "unknown" and out[1]["id"] is None
    assert out[0]["time"] == out[0]["received_at"] == "2026-12-01T23:59:59.000000Z"
    clock.t = T0 + dt.timedelta(seconds=2)  # past midnight UTC: a new day file
    store.append("mnist-0", {"id": 7, "label": "normal", "time": 1_700_000_000})
    files = sorted(p.name for p in store.path("mnist-0").iterdir())
    assert files == ["2026-12-01.jsonl", "2026-12-02.jsonl"]
    got = list(store.read("mnist-0"))
    assert [r["label"] for r in got] == ["normal", "anomaly", "normal"]
    assert got[1]["image"] == image.tolist()
    assert got[2]["id"] == "7" and got[2]["time"] == "2023-11-14T22:13:20.000000Z"
    assert got == [*out, got[2]]
    assert store.models() == ["mnist-0"]
    assert list(store.read("other")) == []
    # Beside the models, in a folder the service's model scan skips.
    assert store.path("mnist-0").parent == tmp_path / "_feedback"


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
    store = _store(tmp_path)
    store.append("m", [{"id": str(i), "label": "normal"} for i in range(3)])
    day = store.path("m") / "2026-12-01.jsonl"
    whole = day.read_bytes()
    with open(day, "ab") as f:  # what a crash in the middle of os.write leaves behind
        f.write(b'{"id":"lost","label":"anom')
    assert [r["id"] for r in store.read("m")] == ["0", "1", "2"]
    store.append("m", {"id": "3", "label": "anomaly"})
    assert [r["id"] for r in store.read("m")] == ["0", "1", "2", "3"]
    data = day.read_bytes()
    assert data.startswith(whole) and b"lost" not in data
    assert all(json.loads(line) for line in data.splitlines())


def test_a_process_killed_mid_write_loses_only_its_unfinished_record(tmp_path):
    store = _store(tmp_path)
    store.append("m", {"id": "kept", "label": "normal"})
    # A real crash: the child writes half of its line and dies without any cleanup.
    child = textwrap.dedent(f"""
        import datetime as dt, os
        from anomaly import feedback
        real = os.write
        def half_then_die(fd, data):
            real(fd, data[: len(data) // 2])
            os._exit(9)
        feedback.os.write = half_then_die
        store = feedback.FeedbackStore({str(tmp_path)!r},
                                       clock=lambda: dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
        store.append("m", {{"id": "unfinished", "label": "anomaly"}})
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(feedback.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True,
                          timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    day = store.path("m") / "2026-12-01.jsonl"
    assert not day.read_bytes().endswith(b"\n")  # the cut-off line is really there
    assert [r["id"] for r in store.read("m")] == ["kept"]
    store.append("m", {"id": "after", "label": "normal"})  # the lock was released by death
    assert [r["id"] for r in store.read("m")] == ["kept", "after"]


def test_failed_write_is_rolled_back(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.append("m", {"id": "a", "label": "normal"})
    day = store.path("m") / "2026-12-01.jsonl"
    before = day.read_bytes()
    real = os.write

    def short_then_fail(fd, data):
        real(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feedback.os, "write", short_then_fail)
    with pytest.raises(OSError, match="No space"):
        store.append("m", {"id": "b", "label": "normal"})
    assert day.read_bytes() == before


def test_damaged_middle_line_is_an_error_naming_the_file(tmp_path):
    store = _store(tmp_path)
    store.append("m", {"id": "a", "label": "normal"})
    day = store.path("m") / "2026-12-01.jsonl"
    with open(day, "ab") as f:
        f.write(b"not json\n")
    store.append("m", {"id": "b", "label": "normal"})
    with pytest.raises(DataError, match=r"damaged line in .*2026-12-01\.jsonl:2"):
        list(store.read("m"))
    assert [r["id"] for r in store.read("m", errors="skip")] == ["a", "b"]


def test_size_cap_refuses_whole_batches(tmp_path):
    store = _store(tmp_path, max_bytes=1000)
    record = {"id": "x" * 50, "label": "normal"}
    n = 0
    with pytest.raises(FeedbackFullError, match=r"Expected feedback within the store's cap of "
                                                r"1000 bytes\. Received: \d+ bytes stored"):
        while True:
            store.append("m", record)
            n += 1
    assert n >= 1 and store.size() <= 1000
    assert len(list(store.read("m"))) == n
    assert FeedbackFullError.status_code == 507
    # The cap covers the whole store, not one model.
    with pytest.raises(FeedbackFullError):
        store.append("other", record)
    big = _store(tmp_path / "b", max_record_bytes=200)
    with pytest.raises(DataError, match="record 0 of at most 200 bytes"):
        big.append("m", {"image": np.zeros((28, 28)), "label": "normal"})


@pytest.mark.parametrize("record, message", [
    ({"label": "normal"}, "Expected record 0 to have an id or an image. Received: neither"),
    ({"id": "a", "label": "Normal"},
     "Expected record 0's label in ['normal', 'anomaly']. Received: 'Normal'"),
    ({"id": "a"}, "Expected record 0's label in ['normal', 'anomaly']. Received: None"),
    ({"id": "a", "label": "normal", "score": 1},
     "Expected record 0's keys among ['id', 'image', 'label', 'time', 'source']. "
     "Received: ['score']"),
    ({"id": "", "label": "normal"}, "Expected record 0's id as a non-empty string"),
    ({"id": True, "label": "normal"}, "Expected record 0's id as a non-empty string"),
    ({"id": "a" * 300, "label": "normal"}, "Received: 300 characters"),
    ({"id": "a", "label": "normal", "source": 3}, "Expected record 0's source as a non-empty"),
    ({"id": "a", "label": "normal", "time": "2026-12-01T10:00:00"},
     "Expected record 0's time as ISO 8601 with a time zone or Unix seconds. "
     "Received: datetime.datetime(2026, 12, 1, 10, 0)"),
    ({"id": "a", "label": "normal", "time": "yesterday"}, "Received: 'yesterday'"),
    ({"id": "a", "label": "normal", "time": float("nan")}, "Received: nan"),
    ({"image": [[1, 2], [3]], "label": "normal"}, "Expected record 0's image as a (H, W)"),
    ({"image": np.zeros(784), "label": "normal"}, "Received: shape (784,)"),
    ({"image": np.full((28, 28), 300.0), "label": "normal"}, "Received: values from 300 to 300"),
    ({"image": np.full((28, 28), -1), "label": "normal"}, "Received: values from -1 to -1"),
    ({"image": np.full((2, 2), np.nan), "label": "normal"}, "Received: NaN or Inf"),
    ({"image": [["a", "b"]], "label": "normal"}, "Received: dtype <U1"),
    ("normal", "Expected record 0 as an object with keys"),
])
def test_bad_records_get_clear_errors_and_nothing_is_written(tmp_path, record, message):
    store = _store(tmp_path)
    with pytest.raises(DataError) as err:
        store.append("m", [record])
    assert str(err.value).startswith("Expected record 0")
    assert message in str(err.value)
    assert list(store.read("m")) == []


def test_one_bad_record_refuses_the_batch_and_names_it(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(DataError, match="Expected record 1's label"):
        store.append("m", [{"id": "a", "label": "normal"}, {"id": "b", "label": "?"}])
    assert list(store.read("m")) == []


@pytest.mark.parametrize("model", ["", "../x", "a/b", ".hidden", "_feedback", 3])
def test_bad_model_names_are_refused(tmp_path, model):
    with pytest.raises(DataError, match="Expected a model name"):
        _store(tmp_path).append(model, {"id": "a", "label": "normal"})


@pytest.mark.parametrize("records", [[], "abc", 5])
def test_records_must_be_a_non_empty_list(tmp_path, records):
    with pytest.raises(DataError, match="Expected a non-empty list of feedback records"):
        _store(tmp_path).append("m", records)


def test_concurrent_appends_never_interleave(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = _store(tmp_path)
    image = np.zeros((28, 28), np.uint8)

    def work(worker: int) -> None:
        for i in range(20):
            store.append("m", [{"id": f"{worker}-{i}-{j}", "image": image, "label": "normal"}
                               for j in range(3)])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    ids = [r["id"] for r in store.read("m")]
    assert sorted(ids) == sorted(f"{w}-{i}-{j}" for w in range(4) for i in range(20)
                                 for j in range(3))
    for w in range(4):  # each worker's records in its own order, batches kept together
        mine = [x for x in ids if x.startswith(f"{w}-")]
        assert mine == [f"{w}-{i}-{j}" for i in range(20) for j in range(3)]
