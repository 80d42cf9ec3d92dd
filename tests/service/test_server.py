"""A real ``anomaly serve`` process on 127.0.0.1: scoring over HTTP, hot reload under load,
tritonclient against the V2 routes, and the command's own errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from anomaly.utils import sha256_file
from tests.service.conftest import REPO, bars, blobs, save_version


def test_scores_over_http_equal_the_detector(server, detector):
    x = np.concatenate([blobs(4, seed=50), bars(2, seed=51)])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post("/v1/models/blobs/score", json={"images": x.tolist(),
                                                   "return_reconstruction": True})
        assert r.status_code == 200, r.text
        body = r.json()
        np.testing.assert_array_equal([i["score"] for i in body["results"]],
                                      detector.detect(x).scores)
        assert np.asarray(body["results"][0]["reconstruction"]).shape == (28, 28)
        bad = c.post("/v1/models/blobs/score", content=b"{", headers={
            "content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        assert "anomaly_requests_total" in c.get("/metrics").text


def test_hot_reload_under_concurrent_load_fails_no_request(server, detector):
    """Four clients score without pause while versions are added, refused and removed."""
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []
    errors: list[str] = []
    body = {"images": blobs(2, seed=60).tolist()}

    def load():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/models/hot/score", json=body)
                    outcomes.append((r.status_code, r.json().get("version", r.text)))
                except Exception as exc:  # a dropped connection is a failure too
                    errors.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as admin:
            time.sleep(0.3)
            save_version(detector, server.root, "hot", "v2")
            assert admin.post("/v1/models/reload").json()["loaded"] == ["hot/v2"]
            time.sleep(0.3)
            v3 = save_version(detector, server.root, "hot", "v3")
            # Broken, with a manifest that matches: verification passes, loading fails.
            (v3 / "model.keras").write_bytes(b"not a keras file")
            manifest = json.loads((v3 / "manifest.json").read_text())
            manifest["files"]["model.keras"] = sha256_file(v3 / "model.keras")
            (v3 / "manifest.json").write_text(json.dumps(manifest))
            report = admin.post("/v1/models/reload").json()
            assert [r["version"] for r in report["refused"]] == ["hot/v3"]
            assert "loadable artifact" in report["refused"][0]["error"]
            time.sleep(0.3)
            for _ in range(3):  # reloads with nothing new are cheap and change nothing
                assert admin.post("/v1/models/reload").status_code == 200
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    statuses = {s for s, _ in outcomes}
    assert statuses == {200}, [o for o in outcomes if o[0] != 200][:3]
    versions = [v for _, v in outcomes]
    assert len(versions) > 20 and versions[0] == "v1" and versions[-1] == "v2"
    assert "v3" not in versions


def test_tritonclient_against_v2_routes(server, detector):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("blobs")
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
        meta = client.get_model_metadata("blobs")
        assert meta["name"] == "blobs" and meta["inputs"][0]["name"] == "images"
        assert {o["name"] for o in meta["outputs"]} == {"anomaly_score", "is_anomaly",
                                                        "reconstruction"}

        x = np.concatenate([blobs(3, seed=70), bars(2, seed=71)])
        expected = detector.detect(x, reconstruction=True)

        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary tensor data: tritonclient's default
        wanted = [triton.InferRequestedOutput(n) for n in ("anomaly_score", "is_anomaly",
                                                            "reconstruction")]
        res = client.infer("blobs", [inp], request_id="req-42", outputs=wanted)
        assert res.get_response()["id"] == "req-42"
        np.testing.assert_array_equal(res.as_numpy("anomaly_score"), expected.scores)
        np.testing.assert_array_equal(res.as_numpy("is_anomaly"), expected.is_anomaly)
        np.testing.assert_allclose(res.as_numpy("reconstruction"), expected.reconstruction,
                                   rtol=1e-6, atol=1e-7)

        # UINT8 [N, 784], JSON tensor data, one requested output in JSON, a named version.
        u8 = np.rint(x * 255).astype(np.uint8).reshape(len(x), 784)
        inp = triton.InferInput("images", list(u8.shape), "UINT8")
        inp.set_data_from_numpy(u8, binary_data=False)
        out = triton.InferRequestedOutput("anomaly_score", binary_data=False)
        res = client.infer("blobs", [inp], outputs=[out], model_version="v1")
        assert [o["name"] for o in res.get_response()["outputs"]] == ["anomaly_score"]
        assert res.get_response()["model_version"] == "v1"
        assert res.as_numpy("is_anomaly") is None
        np.testing.assert_allclose(res.as_numpy("anomaly_score"), detector.decision_function(u8.reshape(
            -1, 28, 28)), rtol=1e-6)

        # Compressed request body.
        inp = triton.InferInput("images", [1, 28, 28], "FP32")
        inp.set_data_from_numpy(x[:1])
        res = client.infer("blobs", [inp], request_compression_algorithm="gzip",
                           outputs=[triton.InferRequestedOutput("is_anomaly")])
        assert res.as_numpy("is_anomaly").shape == (1,)

        with pytest.raises(InferenceServerException, match="Expected a model in"):
            client.infer("nope", [inp])
        bad = triton.InferInput("images", [1, 27, 28], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 27, 28), np.float32))
        with pytest.raises(InferenceServerException, match="Expected input 'images' of shape"):
            client.infer("blobs", [bad])
        nan = np.full((1, 28, 28), np.nan, np.float32)
        inp.set_data_from_numpy(nan)
        with pytest.raises(InferenceServerException, match="finite"):
            client.infer("blobs", [inp])
        assert client.is_server_live()  # still serving
    finally:
        client.close()


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "anomaly.cli", "serve", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **env})


def test_serve_command_errors_are_one_line(tmp_path):
    r = run_serve("--models", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: Expected a models directory") and "missing" in r.stderr
    r = run_serve("--models", str(tmp_path), "--workers", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "one worker per process" in r.stderr
    r = run_serve("--models", str(tmp_path), ANOMALY_MAX_BATCH_IMAGES="lots")
    assert r.returncode == 2 and "ANOMALY_MAX_BATCH_IMAGES" in r.stderr
    r = run_serve("--models", str(tmp_path), ANOMALY_API_KEYS="k", ANOMALY_PORT="99999")
    assert r.returncode == 2 and "ANOMALY_PORT" in r.stderr
