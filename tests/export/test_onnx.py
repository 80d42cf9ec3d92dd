"""``anomaly export --format onnx``: one graph that scores like the TensorFlow detector.

Every model of the family (the session's tiny fixtures, their plain scores), plus the default
``mse+knn`` score and a restoration model, are converted, run in onnxruntime and compared with
``Detector.decision_function`` / ``detect`` on images the export never saw.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly.artifact import read_artifact
from anomaly.errors import ConfigError
from tests.conftest import TINY, error_line, run_cli, tiny_detector

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

from anomaly.export import onnx as export  # noqa: E402  (after the skips)


@pytest.fixture(scope="module")
def images(normal_test_images, anomaly_images):
    return np.concatenate([normal_test_images[:16], anomaly_images[:16]])


def _run(data: bytes, x: np.ndarray) -> dict:
    session = export.onnx_session(data)
    return dict(zip(export.OUTPUTS, session.run(list(export.OUTPUTS), {export.INPUT: x}),
                    strict=True))


def _check(det, data: bytes, x: np.ndarray) -> None:
    got = _run(data, x)
    want = det.detect(x, reconstruction=True, error_map=True)
    assert got["score"].dtype == np.float64 and got["score"].shape == (len(x),)
    np.testing.assert_array_less(np.abs(got["score"] - want.scores),
                                 export.score_tolerance(det, want.parts) + 1e-300)
    if len(want.parts[0]) == 1:  # a single part: plainly 1e-5 relative
        np.testing.assert_allclose(got["score"], det.decision_function(x), rtol=1e-5, atol=0)
    names = list(det.calibration_.operating_points)
    for j, name in enumerate(names):
        np.testing.assert_array_equal(got["is_anomaly"][:, j], det.calibration_.decide(
            want.scores, name))
    np.testing.assert_allclose(got["normalized"], det.calibration_.normalize(got["score"]))
    assert got["reconstruction"].shape == want.reconstruction.shape == x.shape
    np.testing.assert_allclose(got["reconstruction"], want.reconstruction, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["error_map"], want.error_map, atol=1e-4, rtol=0)
    # No padding in the graph: an image scores the same alone as in its batch, to the export's
    # own tolerance (onnxruntime picks other float32 kernels for one row than for 32: 1.9e-6
    # relative measured on a barely trained dense-ae; 6.2e-7 absolute on the MNIST model).
    alone = np.concatenate([_run(data, x[i : i + 1])["score"] for i in range(0, len(x), 7)])
    np.testing.assert_allclose(alone, got["score"][::7], rtol=1e-5, atol=0)


@pytest.mark.parametrize("model", sorted(TINY))
def test_every_model_scores_like_tensorflow(fitted, model, images):
    det = fitted(model)
    data, sidecar, err = export.export_bytes(det)
    assert err <= export.TOLERANCE
    _check(det, data, images)
    assert sidecar["input"]["shape"] == [-1, 28, 28]
    assert sidecar["operating_points"] == list(det.calibration_.operating_points)


@pytest.mark.parametrize("params", [{"score": "mse+knn", "aggregation": "top10"},
                                    {"model": "conv-ae", "transforms": "rot4"},
                                    {"score": "mse+knn+tp", "aggregation": "top10"}],
                         ids=["dense-ae-mse+knn", "conv-ae-rot4", "dense-ae-mse+knn+tp"])
def test_knn_memory_and_restoration_are_inside_the_graph(normal_images, images, params):
    params = dict(params)
    if params.get("score") == "mse+knn+tp":
        # The blobs look the same every way up: a bar along their top edge gives them an
        # orientation for the classifier to learn (else its part is a constant whose tiny
        # spread the standardizer would blow up to unit scale, rounding noise included).
        normal_images = normal_images.copy()
        normal_images[:, 1:4, 4:24] = 1.0
        params["epochs"] = 8
    det = tiny_detector(params.pop("model", "dense-ae"), **params).fit(normal_images)
    data, sidecar, _ = export.export_bytes(det)
    _check(det, data, images)
    session = export.onnx_session(data)
    assert [i.name for i in session.get_inputs()] == ["images"]  # the memory is no input
    assert sidecar["parts"] == list(det.scorer.part_names)


def test_colour_images_keep_their_channels(normal_images, images):
    rgb = np.repeat(normal_images[..., None], 3, axis=-1) * np.array([1.0, 0.8, 0.6],
                                                                     np.float32)
    det = tiny_detector("conv-ae").fit(rgb)
    data, sidecar, _ = export.export_bytes(det)
    assert sidecar["input"]["shape"] == [-1, 28, 28, 3]
    x = np.repeat(images[..., None], 3, axis=-1)
    _check(det, data, x)


def test_monte_carlo_elbo_is_refused(fitted):
    from sklearn.base import clone

    det = clone(fitted("vae"))
    det.set_params(mc_samples=4)
    with pytest.raises(ConfigError, match="mc_samples 0"):
        export.check_exportable(det)


def test_export_writes_a_new_verified_version(saved_artifact, tmp_path):
    import shutil

    import onnx

    src = tmp_path / "models" / "blobs" / "1"
    shutil.copytree(saved_artifact, src)
    out = export.export_onnx(src)
    assert out.path.parent == src.parent and out.path != src
    art = read_artifact(out.path)  # verifies every SHA-256
    source = read_artifact(src)
    assert set(art.manifest["files"]) == set(source.manifest["files"]) | {"model.onnx",
                                                                         "onnx.json"}
    for name in source.manifest["files"]:
        if name != "metadata.json":
            assert art.manifest["files"][name] == source.manifest["files"][name], name
    assert art.metadata["exported_from"] == {"name": "blobs", "version": "1",
                                             "artifact_sha256": source.sha256}
    assert art.metadata["dataset"] == "blobs"
    sidecar = art.json("onnx.json")
    assert sidecar["calibration"] == art.json("calibration.json")
    proto = onnx.load(str(art.file("model.onnx")))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["anomaly.calibration"]) == sidecar["calibration"]
    assert json.loads(props["anomaly.operating_points"]) == sidecar["operating_points"]
    assert sorted(o.name for o in proto.graph.output) == sorted(export.OUTPUTS)


def test_cli_export_and_its_errors(saved_artifact, tmp_path):
    dest = tmp_path / "exported"
    result = run_cli("export", saved_artifact, "--format", "onnx", "--output", dest)
    assert result.returncode == 0, result.stderr
    assert "max relative score difference" in result.stdout
    assert read_artifact(dest).has("model.onnx")
    again = run_cli("export", saved_artifact, "--output", dest)
    assert again.returncode != 0
    assert "does not exist yet" in error_line(again.stderr)
    missing = run_cli("export", tmp_path / "nope")
    assert missing.returncode != 0
    assert "Expected an artifact directory" in error_line(missing.stderr)
    bad = run_cli("export", saved_artifact, "--format", "tflite")
    assert bad.returncode == 2
    assert "tflite" in error_line(bad.stderr)


def test_knn_parts_are_compared_relative_to_the_distances_conditioning():
    """Rounding the codes moves a small distance between large codes by more of itself: the
    comparison allows for that, and only for that."""
    from types import SimpleNamespace

    r = 20.0  # the memory codes' norm
    det = SimpleNamespace(score="mse+knn",
                          knn_=SimpleNamespace(memory=np.full((50, 4), r / 2, np.float32)))
    near = np.log(0.04)  # sqrt(d) = 0.2: condition r / sqrt(d) = 100
    want = np.array([[0.1, near], [0.1, np.log(r * r * 4)]])
    off = 5e-5
    got = want + np.array([[0, off], [0, 0]])
    assert export.part_error(det, got, want) == pytest.approx(off / 100)
    # At a distance as large as the codes the same difference counts in full, and the other
    # parts are never scaled.
    assert export.part_error(det, want + np.array([[0, 0], [0, off]]), want) == pytest.approx(off)
    assert export.part_error(det, want + np.array([[off, 0], [0, 0]]), want) == pytest.approx(off)
