"""anomaly.runtime as the service uses it: one loader, two backends, no TensorFlow for ONNX.

Here, with the full install, in fresh subprocesses: ``ANOMALY_RUNTIME=onnx`` with TensorFlow
installed (it must still never be imported), and TensorFlow made unimportable
(``sys.modules["tensorflow"] = None``, which is what ``import`` and ``find_spec`` see when the
package is absent) with the default ``auto``. The light install itself (``pip install
"anomaly[serve]"`` in a clean venv) is tests/service/test_light_install.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from anomaly.errors import ArtifactError, ConfigError
from anomaly.runtime import OnnxDetector, choose_runtime, load_runtime
from tests.service.conftest import METADATA, REPO, assert_close_scores, bars, blobs

pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")


def test_choose_runtime():
    # Both can run: onnxruntime, the faster on a CPU (bench/results/runtime-bench.md).
    assert choose_runtime(True, "auto", tensorflow=True) == "onnx"
    assert choose_runtime(True, "auto", tensorflow=True, prefer="keras") == "keras"
    assert choose_runtime(False, "auto", tensorflow=True) == "keras"
    assert choose_runtime(True, "auto", tensorflow=False) == "onnx"
    assert choose_runtime(True, "ONNX", tensorflow=True) == "onnx"
    with pytest.raises(ArtifactError, match=r"TensorFlow is not installed.*anomaly export"):
        choose_runtime(False, "auto", tensorflow=False)
    with pytest.raises(ArtifactError, match=r"ANOMALY_RUNTIME=onnx.*no model\.onnx.*anomaly "
                       "export"):
        choose_runtime(False, "onnx", tensorflow=True)
    with pytest.raises(ConfigError, match="TensorFlow installed for ANOMALY_RUNTIME=keras"):
        choose_runtime(True, "keras", tensorflow=False)
    with pytest.raises(ConfigError, match=r"Expected ANOMALY_RUNTIME in \('auto', 'keras', "
                       r"'onnx'\). Received: 'tensorrt'"):
        choose_runtime(True, "tensorrt", tensorflow=True)


def test_environment_picks_the_runtime(onnx_root, monkeypatch):
    monkeypatch.setenv("ANOMALY_RUNTIME", "onnx")
    assert isinstance(load_runtime(onnx_root / "exported" / "v1"), OnnxDetector)
    monkeypatch.setenv("ANOMALY_RUNTIME", "keras")
    det = load_runtime(onnx_root / "exported" / "v1")
    assert det.runtime_ == "keras" and type(det).__name__ == "Detector"


def test_onnx_backend_detects_like_the_detector(onnx_root, detector):
    rt = load_runtime(onnx_root / "exported" / "v1", runtime="onnx")
    assert (rt.model, rt.score, rt.aggregation) == (detector.model, detector.score,
                                                    detector.aggregation)
    assert rt.image_shape_ == tuple(detector.image_shape_)
    assert rt.calibration_.fingerprint() == detector.calibration_.fingerprint()
    assert rt.metadata_["dataset"] == METADATA["dataset"]
    x = np.concatenate([blobs(6, seed=5), bars(3)])
    for op in detector.calibration_.operating_points:
        got = rt.detect(x, operating_point=op, reconstruction=True, error_map=True)
        want = detector.detect(x, operating_point=op, reconstruction=True, error_map=True)
        assert_close_scores(detector, got.scores, want)
        np.testing.assert_array_equal(got.is_anomaly, want.is_anomaly)
        np.testing.assert_allclose(got.normalized, want.normalized, rtol=1e-15, atol=0)
        assert (got.operating_point, got.threshold) == (want.operating_point, want.threshold)
        assert got.reconstruction.shape == want.reconstruction.shape == (9, 28, 28)
        np.testing.assert_allclose(got.error_map, want.error_map, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(rt.predict(x), detector.predict(x))
    # Unvalidated input goes through the same pixel rules: 0-255 integers.
    u8 = np.rint(x * 255).astype(np.uint8)
    assert_close_scores(detector, rt.decision_function(u8), detector.detect(u8))


def test_a_batch_split_over_threads_scores_like_its_calls_in_turn(onnx_root):
    from anomaly.runtime import CHUNK

    x = np.concatenate([blobs(2 * CHUNK + 5, seed=7), bars(3)])  # three calls and a part
    split = load_runtime(onnx_root / "exported" / "v1", runtime="onnx", threads=2)
    serial = load_runtime(onnx_root / "exported" / "v1", runtime="onnx", threads=1)
    assert (split.threads_, serial.threads_) == (2, 1)
    got, want = (rt.detect(x, reconstruction=True) for rt in (split, serial))
    for field in ("scores", "normalized", "is_anomaly", "parts", "reconstruction"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    # In the images' order: each row is its own image's.
    alone = [serial.detect(x[i : i + 1], reconstruction=True) for i in range(0, len(x), 9)]
    np.testing.assert_allclose(got.reconstruction[::9], [o.reconstruction[0] for o in alone],
                               rtol=0, atol=1e-6)


def test_a_graph_with_other_thresholds_is_refused(onnx_root, tmp_path):
    import shutil

    from anomaly.artifact import read_artifact, write_artifact

    art = read_artifact(onnx_root / "exported" / "v1")
    files = {f: (art.path / f).read_bytes() for f in art.manifest["files"]
             if f not in ("manifest.json", "metadata.json")}
    cal = json.loads(files["calibration.json"])
    for point in cal["operating_points"].values():
        point["threshold"] += 1.0
    files["calibration.json"] = json.dumps(cal).encode()  # re-signed: the manifest is fine
    dest = write_artifact(tmp_path / "m" / "v1", files, metadata={})
    with pytest.raises(ArtifactError, match="exported with this artifact's calibration"):
        load_runtime(dest, runtime="onnx")
    shutil.rmtree(dest)


def _top_level_imports(path) -> set[str]:
    """Modules a file imports when it is imported (its body, not its functions)."""
    import ast

    out: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.If | ast.Try | ast.With):
            todo += [n for field in ("body", "orelse", "finalbody", "handlers")
                     for n in getattr(node, field, []) if isinstance(n, ast.stmt)]
    return out


def test_no_module_level_tensorflow_on_the_serving_path():
    """What importing the app loads, followed through the project's modules: no TensorFlow,
    Keras, or module that imports them (the subprocess tests below check the running app)."""
    heavy = ("tensorflow", "keras", "tf2onnx", "anomaly._tf", "anomaly.models",
             "anomaly.scoring", "anomaly.detector", "anomaly.training")
    seen, todo = set(), ["service.app", "anomaly.runtime"]  # runtime: imported lazily
    while todo:
        mod = todo.pop()
        path = next((p for p in (REPO / (mod.replace(".", "/") + ".py"),
                                 REPO / mod.replace(".", "/") / "__init__.py") if p.is_file()),
                    None)
        if path is None or mod in seen:
            continue
        seen.add(mod)
        for name in _top_level_imports(path):
            assert not name.startswith(heavy), f"{mod} imports {name} at module level"
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)
                     if parts[0] in ("anomaly", "service")]
    assert {"anomaly.runtime", "service.loading", "service.registry"} <= seen


def _python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    environ = {k: v for k, v in os.environ.items() if k != "ANOMALY_RUNTIME"}
    environ.update({"PYTHONPATH": str(REPO), **env})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, cwd=REPO, env=environ, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_SERVE = """
    import json, sys
    {prelude}
    from fastapi.testclient import TestClient
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(models_dir={root!r}))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.portal.call(c.app.state.registry.wait_loaded)
        models = {{m["name"]: m for m in c.get("/v1/models").json()["models"]}}
        r = c.post("/v1/models/exported/score", json={{"images": {images}}})
        v2 = c.get("/v2/models/exported").json()
    print(json.dumps({{"models": models, "status": r.status_code, "body": r.json(),
                      "platform": v2["platform"],
                      "tensorflow": "tensorflow" in sys.modules and sys.modules["tensorflow"]
                      is not None,
                      "keras": "keras" in sys.modules and sys.modules["keras"] is not None}}))
"""


def _check_served(out: dict, detector, x: np.ndarray) -> None:
    assert out["status"] == 200, out["body"]
    assert_close_scores(detector, [r["score"] for r in out["body"]["results"]], detector.detect(x))
    assert [r["is_anomaly"] for r in out["body"]["results"]] == detector.predict(x).tolist()
    assert out["models"]["exported"]["ready"]
    assert out["platform"] == "onnxruntime_onnx"
    assert not out["tensorflow"] and not out["keras"]


def test_onnx_runtime_never_imports_tensorflow(onnx_root, detector):
    x = np.concatenate([blobs(3, seed=9), bars(2)])
    code = _SERVE.format(prelude="", root=str(onnx_root), images=x.tolist())
    out = _python(code, ANOMALY_RUNTIME="onnx")
    _check_served(out, detector, x)
    (refused,) = out["models"]["plain"]["refused_versions"]
    assert "ANOMALY_RUNTIME=onnx" in refused["error"] and "anomaly export" in refused["error"]


def test_without_tensorflow_exports_serve_and_others_are_refused(onnx_root, detector):
    x = np.concatenate([blobs(3, seed=11), bars(2, seed=3)])
    hide = 'sys.modules["tensorflow"] = sys.modules["keras"] = None  # not installed'
    out = _python(_SERVE.format(prelude=hide, root=str(onnx_root), images=x.tolist()))
    _check_served(out, detector, x)
    plain = out["models"]["plain"]
    assert not plain["ready"]
    (refused,) = plain["refused_versions"]
    assert refused["error"].startswith("Expected an artifact exported to ONNX (model.onnx) "
                                       "because TensorFlow is not installed. Received: no "
                                       "model.onnx in ")
    assert "Run 'anomaly export ARTIFACT --format onnx'" in refused["error"]
