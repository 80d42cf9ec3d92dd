"""Graceful shutdown of a real server process: on SIGTERM readiness goes 503 while every
request is still served for ANOMALY_SHUTDOWN_DRAIN_SECONDS, then the server stops accepting
connections, and a request that was in flight all along still completes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx

from tests.deploy.conftest import wait_for
from tests.service.conftest import Server, blobs

DRAIN = 2.0


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return float(re.search(r"^anomaly_requests_in_flight (\S+)$", text, re.M).group(1))


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_drains_with_readiness_503_and_finishes_in_flight_requests(models_dir):
    srv = Server(models_dir, ANOMALY_SHUTDOWN_DRAIN_SECONDS=str(DRAIN),
                 ANOMALY_GRACEFUL_SHUTDOWN_SECONDS="20")
    release = threading.Event()
    result: dict = {}
    images = blobs(3, seed=11)
    payload = json.dumps({"images": images.tolist()}).encode()

    def slow_body():  # half the body now, the rest once the server is shutting down
        yield payload[: len(payload) // 2]
        release.wait(30)
        yield payload[len(payload) // 2:]

    def slow_request():
        try:
            r = httpx.post(srv.url + "/v1/models/blobs/score", content=slow_body(),
                           headers={"content-type": "application/json"}, timeout=60)
            result.update(status=r.status_code, body=r.json())
        except Exception as exc:  # reported by the assertion below
            result["error"] = repr(exc)

    thread = threading.Thread(target=slow_request)
    try:
        srv.wait_ready()
        thread.start()
        # The slow request is being handled (the /metrics request itself is the other one).
        wait_for(lambda: in_flight(srv.url) >= 2, 10, "the slow request to be in flight")

        srv.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: httpx.get(srv.url + "/readyz", timeout=2).status_code == 503, DRAIN,
                 "/readyz to answer 503", interval=0.05)
        r = httpx.get(srv.url + "/readyz", timeout=2)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
        # Still serving everything else while draining.
        assert httpx.get(srv.url + "/healthz", timeout=2).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready", timeout=2).status_code == 400
        scored = httpx.post(srv.url + "/v1/models/blobs/score", timeout=10,
                            json={"images": images[:1].tolist()})
        assert scored.status_code == 200, scored.text
        assert re.search(r"^anomaly_ready 0\.0$", httpx.get(srv.url + "/metrics").text, re.M)

        # After the drain: no new connections, the in-flight request still open.
        wait_for(lambda: refused(srv.url), DRAIN + 10, "the listening socket to close",
                 interval=0.05)
        assert time.monotonic() - sent >= DRAIN - 0.3
        assert thread.is_alive() and not result
        release.set()
        thread.join(30)
        assert result.get("status") == 200, result
        assert len(result["body"]["results"]) == len(images)
        rc = srv.proc.wait(timeout=30)
        assert rc in (0, -signal.SIGTERM), f"exit status {rc}:\n{srv.output()}"
        assert "Traceback" not in srv.output(), srv.output()
    finally:
        release.set()
        srv.stop()
        if thread.is_alive():
            thread.join(10)
