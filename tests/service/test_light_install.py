"""The light install for real (issue #12): ``pip install "anomaly[serve]"`` in a clean venv.

What a user of the service gets, and the Docker image's default install: no TensorFlow, Keras,
tf2onnx or onnx; ``anomaly serve`` scores an ONNX export as the full install scores the
artifact (within the export's tolerance) and refuses an artifact without one, naming ``anomaly
export``; ``anomaly score`` writes its CSV; every command that needs TensorFlow ends in one line
naming the extra to install.

The venv is built once per test session, by pip from the package index (about half a minute
with pip's cache warm, a minute or two cold), from a copy of what the install reads
(pyproject.toml, its readme, the packages): building in the checkout would leave build/ there.
The artifacts are made and exported in this process, which has the full install.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import REPO, Server, assert_close_scores, bars, blobs

pytest.importorskip("tf2onnx")  # the exports are made here

pytestmark = pytest.mark.e2e

#: What the light install must not have.
HEAVY = ("tensorflow", "keras", "tf2onnx", "onnx")
#: What it must have: the runtime and the service.
NEEDED = ("onnxruntime", "fastapi", "uvicorn", "prometheus_client", "multipart")
NOT_INSTALLED = ("error: Expected TensorFlow installed for '{}'. Received: not installed. "
                 'Install it with: pip install "anomaly[full]"')


def _env() -> dict[str, str]:
    """This environment without what would point the venv's interpreter at the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ANOMALY_RUNTIME")}


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory) -> Path:
    """A clean venv with ``pip install "<a copy of the checkout>[serve]"`` (not editable)."""
    root = tmp_path_factory.mktemp("light-install")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(REPO / name, src / name)
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", f"{src}[serve]"],
        capture_output=True, text=True, cwd=root, env=_env(), timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return venv


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``venv/bin/anomaly ARGV``, outside the checkout."""
    return subprocess.run([str(venv / "bin" / "anomaly"), *argv], capture_output=True,
                          text=True, cwd=cwd, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def light_models(onnx_root, tmp_path_factory) -> Path:
    """``exported/v1`` (with model.onnx) and ``plain/v1`` (without), for the light venv."""
    models = tmp_path_factory.mktemp("light-models") / "models"
    for name in ("exported", "plain"):
        shutil.copytree(onnx_root / name, models / name)
    return models


def test_the_light_install_has_no_tensorflow(light_venv, tmp_path):
    code = ("import importlib.util as u, json, anomaly; print(json.dumps({'anomaly': "
            f"anomaly.__file__, **{{m: u.find_spec(m) is not None for m in {HEAVY + NEEDED}}}}}))")
    done = subprocess.run([str(light_venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, cwd=tmp_path, env=_env(), timeout=60, check=True)
    found = json.loads(done.stdout)
    assert Path(found.pop("anomaly")).is_relative_to(light_venv)  # the install, not the checkout
    assert [m for m in HEAVY if found[m]] == []
    assert [m for m in NEEDED if not found[m]] == []


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_the_light_install_serves_an_export_like_the_full_install(light_venv, light_models,
                                                                   detector, tmp_path):
    x = np.concatenate([blobs(3, seed=13), bars(2, seed=5)])
    served = tmp_path / "models"  # ready only when every model loads: the export first
    shutil.copytree(light_models / "exported", served / "exported")
    srv = Server(served, program=[str(light_venv / "bin" / "anomaly"), "serve"])
    with srv.serving(), httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/models/exported/score", json={"images": x.tolist()})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert_close_scores(detector, [i["score"] for i in results], detector.detect(x))
        assert [i["is_anomaly"] for i in results] == detector.predict(x).tolist()
        # Image files too (multipart, PNG decoded by Pillow), scored as their 0-255 pixels.
        files = [("images", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(x)]
        r = c.post("/v1/models/exported/score", files=files)
        assert r.status_code == 200, r.text
        u8 = np.rint(x * 255).astype(np.uint8)
        assert_close_scores(detector, [i["score"] for i in r.json()["results"]],
                            detector.detect(u8))
        r = c.post("/v1/models/exported/score", json={"images": [
            base64.b64encode(_png(x[0])).decode()]})
        assert r.status_code == 200, r.text
        assert c.get("/v2/models/exported").json()["platform"] == "onnxruntime_onnx"
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "anomaly_images_scored_total" in metrics.text
        # An artifact without model.onnx is refused, saying how to export it.
        shutil.copytree(light_models / "plain", served / "plain")
        assert c.post("/v1/models/reload").status_code == 200
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["exported"]["ready"] and not models["plain"]["ready"]
        (refused,) = models["plain"]["refused_versions"]
        assert "TensorFlow is not installed" in refused["error"]
        assert "Run 'anomaly export ARTIFACT --format onnx'" in refused["error"]


def test_the_light_install_scores_a_csv(light_venv, light_models, detector, tmp_path):
    x = np.concatenate([blobs(4, seed=21), bars(2, seed=6)])
    np.save(tmp_path / "x.npy", x)
    done = _run(light_venv, "score", str(light_models / "exported"), "--input", "x.npy",
                "--output", "scores.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    df = pd.read_csv(tmp_path / "scores.csv")
    assert_close_scores(detector, df["score"].to_numpy(), detector.detect(x))
    assert df["is_anomaly"].tolist() == detector.predict(x).tolist()
    listed = _run(light_venv, "models", str(light_models), "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2
    plain = _run(light_venv, "score", str(light_models / "plain" / "v1"), "--input", "x.npy",
                 "--output", "plain.csv", cwd=tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.startswith("error: Expected an artifact exported to ONNX (model.onnx) "
                                   "because TensorFlow is not installed."), plain.stderr
    assert not (tmp_path / "plain.csv").exists()


def test_the_light_install_lays_out_an_export_for_kserve(light_venv, light_models, tmp_path):
    """An artifact that carries its export needs no TensorFlow to become a Triton model
    repository and an InferenceService."""
    done = _run(light_venv, "export", str(light_models / "exported" / "v1"), "--format",
                "kserve", "--output", "repo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "repo" / "inferenceservice.yaml").is_file()
    (graph,) = (tmp_path / "repo").glob("*/1/model.onnx")
    assert graph.read_bytes() == (light_models / "exported" / "v1" / "model.onnx").read_bytes()


# Each command that runs the Keras model, as a user would type it on the light install.
NEEDS_TENSORFLOW = {
    "fit": ["fit", "--normal-class", "0"],
    "evaluate": ["evaluate", "{models}/exported/v1"],
    "calibrate": ["calibrate", "{models}/exported/v1", "--normal", "x.npy"],
    "export": ["export", "{models}/plain/v1"],
    "report": ["report", "{models}/exported/v1"],
    "benchmark": ["benchmark", "--classes", "0"],
    "embed": ["embed", "{models}/exported/v1", "--input", "x.npy", "--output", "codes.npy"],
    "denoise": ["denoise", "{models}/exported/v1", "--input", "x.npy", "--output", "r.npy"],
    "models": ["models", "--available"],
}


@pytest.mark.parametrize("command", sorted(NEEDS_TENSORFLOW))
def test_commands_that_need_tensorflow_name_the_extra(command, light_venv, light_models,
                                                      tmp_path):
    np.save(tmp_path / "x.npy", blobs(2))
    argv = [a.format(models=light_models) for a in NEEDS_TENSORFLOW[command]]
    done = _run(light_venv, *argv, cwd=tmp_path)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines() == [NOT_INSTALLED.format(f"anomaly {command}")], done.stderr
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # nothing written
