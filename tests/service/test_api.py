"""The v1 routes with valid requests: health, model information, scoring in every input form."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.service.conftest import bars, blobs


def png_b64(img: np.ndarray, size: int = 28) -> str:
    u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    pil = Image.fromarray(u8, mode="L")
    if size != 28:
        pil = pil.resize((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def scores_of(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([r["score"] for r in resp.json()["results"]])


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_readiness_is_503_without_models_and_healthz_stays_up(app_factory, tmp_path):
    with app_factory(tmp_path, ready=False) as c:
        assert c.get("/healthz").status_code == 200
        c.portal.call(c.app.state.registry.wait_loaded)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"
        assert "no model artifacts" in r.json()["error"]["message"]
        assert c.get("/v2/health/ready").status_code == 400


def test_gc_threshold_is_set_while_serving_and_restored_after(app_factory, tmp_path):
    import gc

    before = gc.get_threshold()
    with app_factory(tmp_path, ready=False, gc_threshold=12_345):
        assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_threshold() == before
    with app_factory(tmp_path, ready=False, gc_threshold=0):  # 0: Python's own
        assert gc.get_threshold() == before


def test_list_and_describe_models(client, detector):
    body = client.get("/v1/models").json()
    (m,) = body["models"]
    assert m["name"] == "blobs" and m["ready"] and m["default_version"] == "v2"
    assert [v["version"] for v in m["versions"]] == ["v2", "v1"]
    v2 = m["versions"][0]
    assert v2["default"] and v2["dataset"] == "blobs" and v2["normal_classes"] == [0]
    assert v2["model_type"] == "dense-ae" and len(v2["artifact_sha256"]) == 64
    ops = {op["name"]: op for op in v2["operating_points"]}
    assert set(ops) == {"fpr@1%", "fpr@10%"}
    point = detector.calibration_.operating_points["fpr@1%"]
    assert ops["fpr@1%"]["threshold"] == point.threshold
    assert ops["fpr@1%"]["fpr_interval"] == list(point.fpr_interval)  # how sure it is
    assert ops["fpr@1%"]["n_reference"] == point.n_reference == len(
        detector.calibration_.reference_scores)
    assert "metrics" in v2
    assert client.get("/v1/models/blobs").json() == m
    one = client.get("/v1/models/blobs/versions/v1").json()
    assert one["version"] == "v1" and not one["default"]


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{name}/score" in spec["paths"]
    assert "/v2/models/{model_name}/infer" in spec["paths"]
    body = spec["paths"]["/v1/models/{name}/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    for path in ("/v1/models/{name}/score", "/v1/models/{name}/versions/{version}/score"):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        assert params["name"]["in"] == "path"
        assert {k for k, p in params.items() if p["in"] == "query"} == {
            "operating_point", "return_reconstruction", "return_error_map", "image_format"}
        assert params["image_format"]["schema"]["enum"] == ["array", "png", "both"]


def test_score_equals_detector_and_anomalies_rank_higher(client, detector):
    x = np.concatenate([blobs(6, seed=5), bars(2)])
    r = client.post("/v1/models/blobs/score", json={"images": x.tolist()})
    body = r.json()
    assert body["model"] == "blobs" and body["version"] == "v2"
    assert body["operating_point"] == "fpr@1%"
    expected = detector.detect(x)
    np.testing.assert_array_equal(scores_of(r), expected.scores)
    res = body["results"]
    assert [r_["index"] for r_ in res] == list(range(8))
    assert [r_["is_anomaly"] for r_ in res] == expected.is_anomaly.tolist()
    np.testing.assert_allclose([r_["normalized_score"] for r_ in res], expected.normalized)
    assert min(scores_of(r)[6:]) > max(scores_of(r)[:6])  # higher = more anomalous


def test_scores_equal_the_anomaly_score_command(client, models_root, tmp_path):
    from anomaly.cli import main

    x = np.concatenate([blobs(5, seed=7), bars(3, seed=8)])
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "scores.csv"
    assert main(["score", str(models_root / "blobs" / "v2"), "--input", str(tmp_path / "x.npy"),
                 "--output", str(out)]) == 0
    cli = pd.read_csv(out)
    r = client.post("/v1/models/blobs/score", json={"images": x.tolist()})
    np.testing.assert_array_equal(scores_of(r), cli["score"].to_numpy())
    assert [i["is_anomaly"] for i in r.json()["results"]] == cli["is_anomaly"].tolist()


def test_pixel_scale_rule_per_image(client):
    img = blobs(1, seed=3)[0]
    as_int = np.rint(img * 255).astype(int)
    as_unit = as_int / 255.0
    r = client.post("/v1/models/blobs/score", json={"images": [
        as_int.tolist(),             # all integers: 0-255
        as_unit.tolist(),            # floats <= 1: [0, 1]
        (as_int * 1.0).tolist(),     # floats > 1 somewhere: 0-255
        png_b64(img),                # PNG pixels: 0-255
    ]})
    s = scores_of(r)
    np.testing.assert_allclose(s, s[0], rtol=1e-5)


def test_integer_image_of_zeros_and_ones_is_0_255(client):
    ones = np.zeros((28, 28), int)
    ones[10:18, 10:18] = 1  # all-integer: read as 0-255, i.e. almost black
    r = client.post("/v1/models/blobs/score", json={"images": [
        ones.tolist(), (ones / 255.0).tolist(), (ones * 1.0).tolist()]})
    s = scores_of(r)
    assert s[0] == pytest.approx(s[1], rel=1e-6)  # the integers were read as 0-255
    assert s[2] != pytest.approx(s[0], rel=1e-2)  # floats <= 1: a white square, not black


def test_base64_png_jpeg_and_data_url(client, detector):
    img = blobs(1, seed=4)[0]
    png = png_b64(img)
    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    jpeg = base64.b64encode(buf.getvalue()).decode()
    wrapped = "\n".join(png[i : i + 76] for i in range(0, len(png), 76))  # `base64` CLI style
    r = client.post("/v1/models/blobs/score", json={"images": [
        png, "data:image/png;base64," + png, jpeg, wrapped, png_b64(img, size=56)]})
    s = scores_of(r)
    ref = detector.decision_function(np.rint(img * 255).astype(np.uint8)[None])[0]
    assert s[0] == pytest.approx(ref, rel=1e-6)
    assert s[1] == s[0] and s[3] == s[0]
    assert s[2] == pytest.approx(ref, rel=0.2) and s[4] == pytest.approx(ref, rel=0.5)


def test_small_requests_run_on_the_loop_but_encoded_images_never(client, monkeypatch):
    """A small body of pixel lists is parsed and answered on the event loop; a base64 PNG in
    an equally small body is decoded in the CPU pool (it may inflate to many pixels)."""
    import service.routers.models
    import service.scoring

    pooled = []
    real = service.scoring.off_loop

    async def spy(request, fn, *args, **kwargs):
        pooled.append(fn.__name__)
        return await real(request, fn, *args, **kwargs)

    for module in (service.scoring, service.routers.models):
        monkeypatch.setattr(module, "off_loop", spy)
    img = blobs(1, seed=4)[0]
    pixels = np.rint(img * 255).astype(int).tolist()
    lists = scores_of(client.post("/v1/models/blobs/score", json={"images": [pixels]}))
    assert pooled == []
    png = scores_of(client.post("/v1/models/blobs/score", json={"images": [png_b64(img)]}))
    assert pooled == ["_decode_json"] and png[0] == pytest.approx(lists[0], rel=1e-6)
    # A large body goes to the pool as one call, and the answer too.
    pooled.clear()
    bright = (255 - np.asarray(pixels)).tolist()  # "255, " per pixel: 8 images ~31 KB
    scores_of(client.post("/v1/models/blobs/score", json={"images": [bright] * 8}))
    assert pooled == ["_parse_and_decode_json", "encode_v1"]


def test_a_request_after_the_model_threads_stopped_is_503_not_500(app_factory, models_root):
    """A scoring request that reaches the micro-batcher once the server began to stop (its
    inference threads are shut down) gets a 503 another replica can retry, not a 500."""
    with app_factory(models_root) as c:
        c.app.state.registry._infer_pool.shutdown()
        img = np.rint(blobs(1, seed=4)[0] * 255).astype(int).tolist()
        r = c.post("/v1/models/blobs/score", json={"images": [img]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert r.headers["Retry-After"] == "1"
        assert "Expected a request before the server began to stop" in r.json()["error"]["message"]


def test_multipart_upload_with_form_and_query_options(client):
    img = blobs(2, seed=6)
    files = [("images", (f"{i}.png", base64.b64decode(png_b64(im)), "image/png"))
             for i, im in enumerate(img)]
    r = client.post("/v1/models/blobs/score?return_error_map=true", files=files,
                    data={"operating_point": "fpr@10%", "return_reconstruction": "true"})
    body = r.json()
    assert r.status_code == 200, r.text
    assert body["operating_point"] == "fpr@10%" and len(body["results"]) == 2
    assert np.asarray(body["results"][0]["reconstruction"]).shape == (28, 28)
    assert np.asarray(body["results"][0]["error_map"]).shape == (28, 28)


def test_reconstruction_and_error_map_formats(client, detector):
    x = blobs(2, seed=9)
    r = client.post("/v1/models/blobs/score", json={
        "images": x.tolist(), "return_reconstruction": True, "return_error_map": True,
        "image_format": "both"})
    res = r.json()["results"]
    out = detector.detect(x, reconstruction=True, error_map=True)
    np.testing.assert_allclose(np.array([i["reconstruction"] for i in res]), out.reconstruction,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array([i["error_map"] for i in res]), out.error_map,
                               rtol=1e-6, atol=1e-7)
    png = Image.open(io.BytesIO(base64.b64decode(res[0]["reconstruction_png"])))
    assert png.size == (28, 28) and png.mode == "L"
    np.testing.assert_allclose(np.asarray(png) / 255, out.reconstruction[0], atol=1 / 255)
    err_png = np.asarray(Image.open(io.BytesIO(base64.b64decode(res[0]["error_map_png"]))))
    assert err_png.max() == 255  # scaled to the image's largest error
    only_png = client.post("/v1/models/blobs/score", json={
        "images": x.tolist(), "return_reconstruction": True, "image_format": "png"}).json()
    assert set(only_png["results"][0]) == {"index", "score", "normalized_score", "is_anomaly",
                                           "reconstruction_png"}


def test_operating_point_body_wins_over_query(client, detector):
    x = np.concatenate([blobs(5, seed=11), bars(2)])
    r = client.post("/v1/models/blobs/score", params={"operating_point": "fpr@1%"},
                    json={"images": x.tolist(), "operating_point": "fpr@10%"})
    body = r.json()
    assert r.status_code == 200, r.text
    op = detector.calibration_.operating_points["fpr@10%"]
    assert body["operating_point"] == "fpr@10%" and body["threshold"] == op.threshold
    assert [i["is_anomaly"] for i in body["results"]] == (scores_of(r) > op.threshold).tolist()
    q = client.post("/v1/models/blobs/score?operating_point=fpr%4010%25",
                    json={"images": x[:1].tolist()}).json()
    assert q["operating_point"] == "fpr@10%"


def test_query_options_are_validated_and_applied(client):
    x = blobs(1).tolist()
    r = client.post("/v1/models/blobs/versions/v1/score",
                    params={"return_error_map": "true", "image_format": "png"},
                    json={"images": x})
    assert r.status_code == 200, r.text
    assert set(r.json()["results"][0]) == {"index", "score", "normalized_score", "is_anomaly",
                                           "error_map_png"}
    for params, field in (({"return_reconstruction": "maybe"}, "query.return_reconstruction"),
                          ({"image_format": "gif"}, "query.image_format")):
        r = client.post("/v1/models/blobs/score", params=params, json={"images": x})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "validation_error" and field in err["message"], err
        assert "Received:" in err["message"], err
    # Unknown query parameters are ignored, as FastAPI ignores them.
    assert client.post("/v1/models/blobs/score?foo=1", json={"images": x}).status_code == 200


def test_score_a_named_version(client):
    x = blobs(1).tolist()
    assert client.post("/v1/models/blobs/versions/v1/score",
                       json={"images": x}).json()["version"] == "v1"
    assert client.post("/v1/models/blobs/score", json={"images": x}).json()["version"] == "v2"


def test_pinned_version_and_versions_per_model(app_factory, models_copy, detector):
    from tests.service.conftest import save_version

    save_version(detector, models_copy, "blobs", "v3")
    with app_factory(models_copy, pinned_versions="blobs=v1", versions_per_model=2) as c:
        m = c.get("/v1/models/blobs").json()
        assert m["default_version"] == "v1" and m["pinned_version"] == "v1"
        assert sorted(v["version"] for v in m["versions"]) == ["v1", "v3"]
        assert m["available_versions"] == ["v1", "v2", "v3"]
        r = c.post("/v1/models/blobs/versions/v2/score", json={"images": blobs(1).tolist()})
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_loaded"
        assert c.post("/v1/models/blobs/score",
                      json={"images": blobs(1).tolist()}).json()["version"] == "v1"


def test_concurrent_requests_get_their_own_results(client, detector):
    """Micro-batched requests are split back correctly: each gets its own images' scores."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [np.concatenate([blobs(1 + i % 3, seed=100 + i), bars(1, seed=200 + i)])
               for i in range(24)]

    def call(x):
        return scores_of(client.post("/v1/models/blobs/score", json={"images": x.tolist()}))

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, batches))
    for x, s in zip(batches, got, strict=True):
        np.testing.assert_allclose(s, detector.detect(x).scores, rtol=1e-5)


def test_bad_environment_is_one_error_line_not_an_import_crash(tmp_path):
    """service.app imports whatever the environment says; uvicorn's ``app`` is built lazily and
    a bad ANOMALY_* variable ends in one error line and exit status 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ANOMALY_MAX_BATCH_IMAGES": "0", "ANOMALY_MODELS_DIR": str(tmp_path)}
    code = "import service.app as m; print('imported'); m.app"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "imported"
    assert proc.returncode == 2
    # An environment-only setting is named by its variable alone (there is no such flag).
    assert "error: Expected a valid ANOMALY_MAX_BATCH_IMAGES (" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_setting_names_its_flag_only_where_serve_has_one(monkeypatch):
    from anomaly.errors import ConfigError
    from service.settings import load_settings

    with pytest.raises(ConfigError, match=r"^Expected a valid --port or ANOMALY_PORT \("):
        load_settings(port=70000)
    with pytest.raises(ConfigError, match=r"^Expected a valid --models or ANOMALY_MODELS_DIR"):
        load_settings(models_dir=["not", "a", "path"])
    monkeypatch.setenv("ANOMALY_GC_THRESHOLD", "-1")
    with pytest.raises(ConfigError, match=r"^Expected a valid ANOMALY_GC_THRESHOLD \(.*"
                                          r"Received: '-1'"):
        load_settings()
