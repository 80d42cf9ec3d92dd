"""The model registry (verify, load, warm up, swap; refusals) and the micro-batcher."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from service.batching import MicroBatcher, ShuttingDown
from tests.service.conftest import blobs, save_version

X1 = {"images": blobs(1).tolist()}


def tamper(path) -> None:
    """Flip one byte of the model file, leaving the manifest as it was."""
    f = path / "model.keras"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def metric(client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_tampered_artifact_is_never_served(app_factory, models_copy):
    tamper(models_copy / "blobs" / "v2")
    with app_factory(models_copy) as c:
        m = c.get("/v1/models/blobs").json()
        assert m["default_version"] == "v1"  # the newest *verified* version
        (refused,) = m["refused_versions"]
        assert refused["version"] == "v2" and "SHA-256" in refused["error"]
        assert c.post("/v1/models/blobs/score", json=X1).json()["version"] == "v1"
        r = c.post("/v1/models/blobs/versions/v2/score", json=X1)
        assert r.status_code == 404 and "SHA-256" in r.json()["error"]["message"]
        assert metric(c, "anomaly_model_refused_versions", model="blobs") == 1


def test_only_version_tampered_means_not_ready(app_factory, models_copy):
    shutil.rmtree(models_copy / "blobs" / "v2")
    tamper(models_copy / "blobs" / "v1")
    with app_factory(models_copy, ready=False) as c:
        c.portal.call(c.app.state.registry.wait_loaded)
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/models/blobs/score", json=X1)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert c.get("/v1/models").json()["models"][0]["ready"] is False


def test_reload_refuses_a_broken_new_version_and_keeps_serving(app_factory, models_copy,
                                                               detector):
    with app_factory(models_copy) as c:
        failures = metric(c, "anomaly_model_load_failures_total", model="blobs")
        # A tampered v3, a v4 without a manifest and a v5 with an unreadable one.
        v3 = save_version(detector, models_copy, "blobs", "v3")
        tamper(v3)
        (models_copy / "blobs" / "v4").mkdir()
        shutil.copytree(models_copy / "blobs" / "v1", models_copy / "blobs" / "v5")
        (models_copy / "blobs" / "v5" / "manifest.json").write_text("{not json")
        report = c.post("/v1/models/reload").json()
        assert sorted(r["version"] for r in report["refused"]) == ["blobs/v3", "blobs/v4",
                                                                   "blobs/v5"]
        assert report["ready"] and report["models"]["blobs"]["default_version"] == "v2"
        assert c.post("/v1/models/blobs/score", json=X1).json()["version"] == "v2"
        refused = c.get("/v1/models/blobs").json()["refused_versions"]
        assert [r["version"] for r in refused] == ["v5", "v4", "v3"]
        assert metric(c, "anomaly_model_load_failures_total", model="blobs") == failures + 3
        assert metric(c, "anomaly_model_refused_versions", model="blobs") == 3
        assert metric(c, "anomaly_model_reloads_total", outcome="partial") >= 1
        # Fixed: the next reload serves it.
        shutil.rmtree(models_copy / "blobs" / "v3")
        shutil.rmtree(models_copy / "blobs" / "v4")
        shutil.rmtree(models_copy / "blobs" / "v5")
        save_version(detector, models_copy, "blobs", "v3")
        report = c.post("/v1/models/reload").json()
        assert report["loaded"] == ["blobs/v3"] and report["removed"] == ["blobs/v1"]
        assert c.post("/v1/models/blobs/score", json=X1).json()["version"] == "v3"
        assert metric(c, "anomaly_model_refused_versions", model="blobs") == 0


def test_a_loaded_version_changed_on_disk_keeps_serving_from_memory(app_factory, models_copy):
    with app_factory(models_copy) as c:
        before = c.post("/v1/models/blobs/score", json=X1).json()
        tamper(models_copy / "blobs" / "v2")
        report = c.post("/v1/models/reload").json()
        assert [r["version"] for r in report["refused"]] == ["blobs/v2"]
        after = c.post("/v1/models/blobs/score", json=X1).json()
        assert after["version"] == "v2" and after["results"] == before["results"]


def test_new_model_added_and_removed_by_reload(app_factory, models_copy, detector):
    with app_factory(models_copy) as c:
        save_version(detector, models_copy, "other", "1")
        report = c.post("/v1/models/reload").json()
        assert report["loaded"] == ["other/1"]
        assert c.post("/v1/models/other/score", json=X1).status_code == 200
        shutil.rmtree(models_copy / "other")
        report = c.post("/v1/models/reload").json()
        assert report["removed"] == ["other/1"]
        assert c.post("/v1/models/other/score", json=X1).status_code == 404


def test_reload_with_missing_directory_is_503_and_keeps_serving(app_factory, models_copy):
    with app_factory(models_copy) as c:
        moved = models_copy.with_name("moved")
        models_copy.rename(moved)
        try:
            r = c.post("/v1/models/reload")
            assert r.status_code == 503 and r.json()["error"]["code"] == "reload_failed"
            assert c.post("/v1/models/blobs/score", json=X1).status_code == 200
        finally:
            moved.rename(models_copy)


def test_directory_problems_are_reported(app_factory, models_copy, detector):
    shutil.copytree(models_copy / "blobs" / "v1", models_copy / "stray")  # artifact, no NAME
    (models_copy / "bad name!").mkdir()
    with app_factory(models_copy) as c:
        problems = c.get("/v1/models").json()["problems"]
        assert len(problems) == 2 and any("stray" in p for p in problems)
    with app_factory(models_copy / "blobs" / "v1", ready=False) as c:
        c.portal.call(c.app.state.registry.wait_loaded)
        r = c.get("/readyz")
        assert r.status_code == 503 and "two levels up" in r.json()["error"]["message"]


def test_metadata_names_come_from_the_path_when_not_given(detector, tmp_path):
    """An artifact saved without a name records ``ROOT/NAME/VERSION`` from its path."""
    path = detector.save(tmp_path / "digits" / "v7")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["name"] == "digits" and meta["version"] == "v7"


# -- micro-batcher -----------------------------------------------------------------------------


@dataclass
class Out:
    """A model call's result: per-image arrays and one per-call value (the key)."""

    scores: np.ndarray
    reconstruction: np.ndarray | None
    key: object


def _run_factory(calls: list, delay: float = 0.02):
    def run(x, key, full):
        calls.append(len(x))
        time.sleep(delay)
        s = x.reshape(len(x), -1).sum(axis=1).astype(np.float64)
        return Out(s, x if full else None, key)

    return run


def test_micro_batcher_merges_concurrent_requests():
    calls: list[int] = []
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(_run_factory(calls), pool, max_images=8)

    async def main():
        xs = [np.full((1 + i % 3, 28, 28), i, np.float32) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(x, full=i == 3)
                                         for i, x in enumerate(xs)))
        return xs, results

    xs, results = asyncio.run(main())
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(r.output.scores, x.reshape(len(x), -1).sum(axis=1))
        assert r.queue_s >= 0 and r.predict_s > 0
    assert len(calls) < 10 and max(calls) <= 8 and sum(calls) == sum(len(x) for x in xs)
    assert results[3].output.reconstruction is not None
    pool.shutdown()


def test_micro_batcher_lone_request_runs_at_once():
    calls: list[int] = []
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(_run_factory(calls, 0.0), pool)
    r = asyncio.run(batcher.submit(np.ones((1, 28, 28), np.float32)))
    assert calls == [1] and r.batch_images == 1 and r.queue_s < 0.05
    pool.shutdown()


def test_micro_batcher_disabled_runs_one_request_per_call():
    calls: list[int] = []
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(_run_factory(calls, 0.001), pool, enabled=False)

    async def main():
        await asyncio.gather(*(batcher.submit(np.zeros((2, 28, 28), np.float32))
                               for _ in range(5)))

    asyncio.run(main())
    assert calls == [2] * 5
    pool.shutdown()


def test_micro_batcher_errors_reach_callers_and_it_recovers():
    pool = ThreadPoolExecutor(1)
    fail = threading.Event()
    fail.set()

    def run(x, key, full):
        time.sleep(0.01)
        if fail.is_set():
            raise RuntimeError("model call failed")
        return Out(np.zeros(len(x)), None, key)

    batcher = MicroBatcher(run, pool)

    async def main():
        x = np.zeros((1, 28, 28), np.float32)
        out = await asyncio.gather(*(batcher.submit(x) for _ in range(3)),
                                   return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in out)
        fail.clear()
        return await batcher.submit(x)

    assert asyncio.run(main()).output.scores.tolist() == [0.0]
    pool.shutdown()


@pytest.mark.parametrize("n", [1, 3])
def test_micro_batcher_survives_cancelled_callers(n):
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(_run_factory([], 0.05), pool)

    async def main():
        x = np.ones((n, 28, 28), np.float32)
        first = asyncio.ensure_future(batcher.submit(x))
        doomed = asyncio.ensure_future(batcher.submit(x))
        await asyncio.sleep(0.01)
        doomed.cancel()
        r = await first
        again = await batcher.submit(x)
        return r, again

    r, again = asyncio.run(main())
    assert r.output.scores.tolist() == again.output.scores.tolist() == [784.0] * n
    pool.shutdown()


def test_micro_batcher_merges_only_requests_of_the_same_key():
    calls: list[tuple[str, int]] = []
    started, release = threading.Event(), threading.Event()

    def run(x, key, full):
        calls.append((key, len(x)))
        if len(calls) == 1:  # hold the first call until the other seven wait
            started.set()
            release.wait(5)
        return Out(x.reshape(len(x), -1).sum(axis=1).astype(np.float64), None, key)

    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(run, pool, max_images=64)

    async def main():
        x = np.ones((1, 28, 28), np.float32)
        first = asyncio.ensure_future(batcher.submit(x * 0, key="a"))
        assert await asyncio.to_thread(started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(x * i, key=("a", "b")[i % 2]))
                for i in range(1, 8)]
        await asyncio.sleep(0)  # the seven are queued
        release.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    assert [r.output.key for r in results] == ["a", "b"] * 4
    assert [r.output.scores.tolist() for r in results] == [[784.0 * i] for i in range(8)]
    # The seven waiting ones: the oldest ("b") and its key's others share one call, then the
    # "a"s another.
    assert calls == [("a", 1), ("b", 4), ("a", 3)], calls
    pool.shutdown()


def test_micro_batcher_starts_the_next_call_without_the_event_loop():
    """The worker takes the waiting requests itself: an event loop busy elsewhere (encoding a
    large response, say) does not hold the model idle between two calls."""
    starts: list[float] = []

    def run(x, key, full):
        starts.append(time.perf_counter())
        time.sleep(0.02)
        return Out(np.zeros(len(x)), None, key)

    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(run, pool)

    async def main():
        x = np.zeros((1, 28, 28), np.float32)
        tasks = [asyncio.ensure_future(batcher.submit(x, key=k)) for k in "abc"]
        await asyncio.sleep(0)  # all three queued; three keys, so three calls
        time.sleep(0.3)  # the loop does not run
        busy_until = time.perf_counter()
        results = await asyncio.gather(*tasks)
        return busy_until, results

    busy_until, results = asyncio.run(main())
    assert [r.output.key for r in results] == list("abc")
    assert len(starts) == 3 and starts[-1] < busy_until
    pool.shutdown()


def test_micro_batchers_sharing_threads_take_turns():
    """A busy model's next call queues behind another model's waiting call."""
    order: list[str] = []

    def runner(name):
        def run(x, key, full):
            order.append(name)
            time.sleep(0.01)
            return Out(np.zeros(len(x)), None, key)
        return run

    pool = ThreadPoolExecutor(1)
    busy, other = MicroBatcher(runner("busy"), pool), MicroBatcher(runner("other"), pool)

    async def main():
        x = np.zeros((1, 28, 28), np.float32)
        # Six keys: six calls of the busy model, queued before the other's one request.
        tasks = [asyncio.ensure_future(busy.submit(x, key=k)) for k in "abcdef"]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(other.submit(x)))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert sorted(order) == ["busy"] * 6 + ["other"]
    assert order.index("other") <= 2, order
    pool.shutdown()


def test_micro_batcher_fails_requests_once_its_executor_is_shut_down():
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(_run_factory([], 0.0), pool)
    pool.shutdown()
    with pytest.raises(ShuttingDown, match="shutting down"):
        asyncio.run(batcher.submit(np.zeros((1, 28, 28), np.float32)))


def test_registry_and_loading_import_no_http_framework():
    """Issue #8's seam: scanning, loading, warm-up and the registry know nothing of HTTP."""
    import subprocess
    import sys

    from tests.service.conftest import REPO

    code = ("import sys, service.registry, service.loading, service.gauges; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
