"""The service at a native, non-square colour shape (40x24x3): v1 JSON and base64 PNG, V2
tensors, and the bad inputs of that shape (a PNG of another size is resized, a nested list of
another shape or a grey tensor is a clear 4xx)."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import running_app

SHAPE = (40, 24, 3)


def _images(n: int, seed: int) -> np.ndarray:
    """Colour stripes whose phase varies: float32 ``(n, 40, 24, 3)``."""
    rng = np.random.default_rng(seed)
    yy = np.arange(SHAPE[0], dtype=np.float32)[None, :, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
    tint = np.array([0.8, 0.5, 0.2], np.float32)
    img = 0.5 + 0.4 * np.sin(yy / 3 + phase) * tint
    return np.broadcast_to(img, (n, *SHAPE)).astype(np.float32).copy()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    from anomaly.detector import Detector

    det = Detector("dense-ae", force_calibration=True, epochs=1, batch_size=32, hidden=[16],
                   latent_dim=3, target_fprs=(0.1,)).fit(_images(60, seed=0))
    root = tmp_path_factory.mktemp("native") / "models"
    det.save(root / "stripes" / "v1", metadata={"dataset": "stripes", "normal_classes": [0],
                                                "name": "stripes", "version": "v1"})
    with running_app(root) as client:
        yield det, client


def _png(img: np.ndarray, size: tuple[int, int] | None = None) -> str:
    pil = Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="RGB")
    if size is not None:
        pil = pil.resize(size[::-1], Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_model_describes_its_shape(native):
    det, client = native
    assert det.image_shape_ == SHAPE
    meta = client.get("/v2/models/stripes").json()
    assert meta["inputs"][0]["shape"] == [-1, 40, 24, 3]


def test_v1_json_scores_equal_the_detector(native):
    det, client = native
    x = _images(3, seed=5)
    u8 = np.rint(x * 255).astype(np.uint8)
    r = client.post("/v1/models/stripes/score", json={
        "images": u8.tolist(), "return_error_map": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    np.testing.assert_allclose([v["score"] for v in res], det.decision_function(u8),
                               rtol=1e-6)
    assert np.asarray(res[0]["error_map"]).shape == SHAPE


def test_v1_png_of_another_size_is_resized(native, caplog):
    det, client = native
    img = _images(1, seed=6)[0]
    big = _png(img, (80, 48))
    with caplog.at_level(logging.INFO, logger="anomaly.data.images"):
        r = client.post("/v1/models/stripes/score", json={"images": [_png(img), big]})
    assert r.status_code == 200, r.text
    same, resized = (v["score"] for v in r.json()["results"])
    ref = det.decision_function(np.rint(img * 255).astype(np.uint8)[None])[0]
    assert same == pytest.approx(ref, rel=1e-6)
    # The 80x48 upload is brought to 40x24 exactly as the Python API brings an array.
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(big))))
    assert pixels.shape == (80, 48, 3)
    assert resized == pytest.approx(det.decision_function(pixels[None])[0], rel=1e-5)
    assert "resizing 1 image(s) of 80x48 to 40x24" in caplog.text


def test_v2_tensor_scores_equal_the_detector(native):
    det, client = native
    x = _images(2, seed=7)
    r = client.post("/v2/models/stripes/infer", json={"inputs": [{
        "name": "images", "datatype": "FP32", "shape": list(x.shape),
        "data": x.ravel().tolist()}], "outputs": [{"name": "anomaly_score"},
                                                  {"name": "reconstruction"}]})
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(outs["anomaly_score"]["data"], det.decision_function(x),
                               rtol=1e-6)
    assert outs["reconstruction"]["shape"] == [2, 40, 24, 3]


@pytest.mark.parametrize("shape", [[1, 28, 28], [1, 24, 40, 3], [1, 1, 1, 3], [1, 40, 24]])
def test_v2_tensor_of_another_shape_is_a_clear_error(native, shape):
    _, client = native
    n = int(np.prod(shape))
    r = client.post("/v2/models/stripes/infer", json={"inputs": [{
        "name": "images", "datatype": "FP32", "shape": shape, "data": [0.5] * n}]})
    assert r.status_code in (400, 422), r.text
    err = r.json()["error"]
    assert err.startswith("Expected ") and "Received: " in err and "40" in err


def test_v1_nested_list_of_another_shape_is_a_clear_error(native):
    _, client = native
    r = client.post("/v1/models/stripes/score", json={"images": [[[0] * 24] * 40]})
    assert 400 <= r.status_code < 500, r.text
    assert "Expected " in r.text and "Received: " in r.text


def test_tritonclient_at_the_native_shape_against_a_real_server(native, tmp_path):
    """The V2 protocol as Triton's own client speaks it, at 40x24x3: metadata, binary and
    JSON tensors, against a real ``anomaly serve`` process."""
    triton = pytest.importorskip("tritonclient.http")
    from tests.service.conftest import Server

    det, _ = native
    root = tmp_path / "models"
    det.save(root / "stripes" / "v1", metadata={"dataset": "stripes", "normal_classes": [0]})
    x = _images(5, seed=9)
    with Server(root).serving() as srv:
        tc = triton.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
        try:
            meta = tc.get_model_metadata("stripes")
            assert meta["inputs"][0]["shape"] == [-1, *SHAPE]
            inp = triton.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            res = tc.infer("stripes", [inp], outputs=[
                triton.InferRequestedOutput(n) for n in ("anomaly_score", "reconstruction")])
            want = det.detect(x, reconstruction=True)
            np.testing.assert_array_equal(res.as_numpy("anomaly_score"), want.scores)
            assert res.as_numpy("reconstruction").shape == (5, *SHAPE)
            u8 = np.rint(x * 255).astype(np.uint8)
            inp = triton.InferInput("images", list(u8.shape), "UINT8")
            inp.set_data_from_numpy(u8, binary_data=False)
            res = tc.infer("stripes", [inp], outputs=[
                triton.InferRequestedOutput("anomaly_score", binary_data=False)])
            np.testing.assert_allclose(res.as_numpy("anomaly_score"),
                                       det.decision_function(u8), rtol=1e-6)
        finally:
            tc.close()
