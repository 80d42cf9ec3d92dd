"""Evaluation reports on tiny models: the files, the self-contained HTML, the numbers.

One conv-vae (2-D latent) is fitted for one epoch through ``anomaly fit`` in-process on a
synthetic labelled .npz (blobs and rings normal, bars anomalous), which writes its report; an
affine-vae (8-unit code: PCA, t-SNE, principal-direction manifold, normalized reconstructions)
is reported on with ``anomaly report``; the session's dense autoencoder (not generative) with
``build_report`` and another data set.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly.artifact import list_artifacts, verify
from anomaly.cli import main
from anomaly.detector import Detector
from anomaly.report import FIGURES, REPORTS_DIR, default_report_dir, report_for_artifact
from tests.conftest import make_bars, make_blobs

#: Figures of every model with both kinds of test images and a history (no t-SNE of a 2-D
#: code, no manifold without a prior, no affine, 2x or denoising pictures, no mse+knn parts,
#: no masks to draw error maps over).
ALWAYS = set(FIGURES) - {"latent_tsne.png", "manifold.png", "affine.png", "denoise.png",
                         "score_parts.png", "decode_2x.png", "mask_errors.png"}
TINY_FIT = ["--epochs", "1", "--batch-size", "32", "--hidden", "8,16", "--latent-dim", "2",
            "--quiet"]


def make_rings(n: int, seed: int = 2) -> np.ndarray:
    """A third shape: a ring of radius 6-9 px near the centre, ``(n, 28, 28)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy, cx = 13.5 + rng.uniform(-2, 2, (2, n))
    r = rng.uniform(6, 9, n)
    d = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
    img = np.exp(-((d - r[:, None, None]) ** 2) / 2) + rng.normal(0, 0.02, (n, 28, 28))
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Labelled shapes: 0 = blob, 1 = ring (normal), 2 = bar (anomaly); an 80/20 split."""
    path = tmp_path_factory.mktemp("data") / "shapes.npz"
    x = np.concatenate([make_blobs(120, seed=4), make_rings(120), make_bars(60, seed=4)])
    y = np.r_[np.zeros(120, int), np.ones(120, int), np.full(60, 2)]
    np.savez(path, x=x, y=y)
    return path


def _run(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def fitted_run(shapes, tmp_path_factory):
    """``anomaly fit`` of a conv-vae on two normal classes; its report is written at the end."""
    root = tmp_path_factory.mktemp("models")
    rc, out = _run("fit", "--force-calibration", "--dataset", shapes, "--normal-class", "0,1", "--model", "conv-vae",
                   *TINY_FIT, "--output", root, "--name", "shapes")
    assert rc == 0, out
    artifact = next((root / "shapes").iterdir())
    return root, artifact, out


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action"):
                self.refs.append((tag, name, value or ""))


def check_report(folder: Path, expected: set[str]) -> dict:
    """Every expected file, valid PNGs of a sensible size, a self-contained page."""
    names = {p.name for p in folder.iterdir()}
    assert names == expected | {"report.html", "summary.json", "per_class.csv"}
    pngs = {}
    for name in expected:
        data = (folder / name).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG"
            w, h = img.size
        assert 300 <= w <= 3000 and 150 <= h <= 3000, (name, img.size)
        pngs[name] = data
    page = (folder / "report.html").read_text()
    parser = _Refs()
    parser.feed(page)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    embedded = []
    for tag, attr, value in parser.refs:
        if attr == "href":
            assert value.startswith("#"), value  # only the table of contents' anchors
        else:
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:60]
            embedded.append(base64.b64decode(value.split(",", 1)[1], validate=True))
    assert "url(" not in page and "http://" not in page and "https://" not in page
    # Each figure on disk is embedded in the page, byte for byte, once.
    assert sorted(embedded) == sorted(pngs.values())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["figures"] == sorted(expected)
    return summary


def test_fit_writes_the_report_beside_the_models(fitted_run):
    root, artifact, out = fitted_run
    folder = root / REPORTS_DIR / "shapes" / artifact.name
    assert default_report_dir(artifact) == folder.resolve()
    assert f"Report: {folder / 'report.html'}" in out
    verify(artifact)  # the artifact holds no unlisted file
    # The service and `anomaly models` see one model version, not the report folder.
    assert [p.name for p in (root / "shapes").iterdir()] == [artifact.name]
    assert [i.path for i in list_artifacts(root)] == [artifact]


def test_fit_report_files_and_numbers(fitted_run):
    root, artifact, _ = fitted_run
    summary = check_report(root / REPORTS_DIR / "shapes" / artifact.name,
                           ALWAYS | {"manifold.png", "score_parts.png"})
    metrics = json.loads((artifact / "metrics.json").read_text())
    # The same test split as `anomaly fit` evaluated on.
    assert summary["n_test"] == metrics["n_test"] and summary["auroc"] == metrics["auroc"]
    op = metrics["operating_points"][metrics["default_operating_point"]]
    assert summary["measured_fpr"] == op["fpr"] and summary["threshold"] == op["threshold"]
    assert summary["latent_projection"] == "none (2-D code)"
    assert summary["normal_classes"] == [0, 1] and summary["code_dim"] == 2
    # k-means ran on every test image (fewer than --max-points): the normal ones for the
    # normal-classes row, all three classes for the other.
    ari = summary["kmeans_ari"]
    n_normal = summary["n_test"] - summary["n_anomalies"]
    assert ari["normal classes"]["k"] == 2 and ari["normal classes"]["n"] == n_normal
    assert ari["all test classes"]["k"] == 3
    assert ari["all test classes"]["n"] == summary["latent_points"] == summary["n_test"]
    lo, hi = summary["auroc_ci95"]
    assert lo <= summary["auroc"] <= hi and summary["partial_auroc_max_fpr"] == 0.1
    assert summary["kept_epoch"] == 1  # one epoch trained
    page = (root / REPORTS_DIR / "shapes" / artifact.name / "report.html").read_text()
    assert "Summary" in page and "AUROC" in page and "expected FPR" in page


def test_no_report_flag(shapes, tmp_path):
    rc, out = _run("fit", "--force-calibration", "--dataset", shapes, "--normal-class", "0", "--model", "dense-ae",
                   "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet",
                   "--no-report", "--output", tmp_path, "--name", "n")
    assert rc == 0 and "Report:" not in out
    assert not (tmp_path / REPORTS_DIR).exists()


def test_report_command_affine_vae(shapes, tmp_path):
    """An 8-unit code: PCA and t-SNE scatter, a principal-direction manifold, normalized
    reconstructions; ``anomaly report`` re-reads the artifact's own test split."""
    rc, out = _run("fit", "--force-calibration", "--dataset", shapes, "--normal-class", "0", "--model", "affine-vae",
                   *TINY_FIT, "--no-report", "--output", tmp_path / "models", "--name", "aff")
    assert rc == 0, out
    artifact = next((tmp_path / "models" / "aff").iterdir())
    rc, out = _run("report", artifact, "--output", tmp_path / "rep", "--tsne", "40",
                   "--max-points", "50")
    assert rc == 0 and f"Report: {tmp_path / 'rep' / 'report.html'}" in out
    summary = check_report(tmp_path / "rep", set(FIGURES) - {"denoise.png", "mask_errors.png"})
    assert summary["code_dim"] == 8
    assert summary["latent_projection"].startswith("PCA")
    assert summary["latent_points"] == 50 and summary["tsne_points"] == 40
    assert "normal classes" not in summary["kmeans_ari"]  # one normal class
    # `anomaly denoise --normalize`: the transform-free reconstructions of the same model.
    x = make_blobs(3, seed=9)
    np.save(tmp_path / "x.npy", x)
    rc, out = _run("denoise", artifact, "--input", tmp_path / "x.npy", "--output",
                   tmp_path / "n.npy", "--normalize")
    assert rc == 0 and "normalized reconstructions of 3 images" in out
    normalized = np.load(tmp_path / "n.npy")
    assert normalized.shape == (3, 28, 28) and 0 <= normalized.min() <= normalized.max() <= 1
    expected = Detector.load(artifact).reconstruct(x, normalize=True)
    np.testing.assert_allclose(normalized, expected, atol=1e-6)


def test_report_of_a_plain_autoencoder_on_another_dataset(saved_artifact, tmp_path):
    """Not generative: no manifold, and the page says why; ``--dataset`` overrides the data."""
    x = np.concatenate([make_blobs(60, seed=8), make_bars(20, seed=8)])
    y = np.r_[np.zeros(60, int), np.ones(20, int)]
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    rep = report_for_artifact(saved_artifact, tmp_path / "rep",
                              dataset=str(tmp_path / "blobs.npz"), tsne_points=0)
    summary = check_report(rep.path, ALWAYS)
    assert summary["n_test"] == 16 and summary["dataset"] == "blobs.npz"
    assert "not a generative model" in rep.notes["manifold.png"]
    assert "t-SNE was turned off" in rep.notes["latent_tsne.png"]
    assert "not a generative model" in rep.html.read_text()


def test_report_never_replaces_a_folder_of_other_files(fitted_run, tmp_path, capsys):
    """The report swaps its whole --output folder: only an earlier report may be replaced."""
    _, artifact, _ = fitted_run
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc = main(["report", str(artifact), "--output", str(precious)])
    assert rc == 2
    assert "Expected an --output folder that is new, empty or an earlier report" in \
        capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
    # An earlier report is replaced in place.
    out = tmp_path / "rep"
    assert main(["report", str(artifact), "--output", str(out), "--tsne", "0"]) == 0
    assert main(["report", str(artifact), "--output", str(out), "--tsne", "0"]) == 0
    assert (out / "report.html").is_file()


class _CountingScores:
    """A detector that counts how often it is asked to score."""

    def __init__(self, detector):
        self._detector = detector
        self.score_calls = 0

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def decision_function(self, images):
        self.score_calls += 1
        return self._detector.decision_function(images)


def test_report_after_fit_reports_on_the_fits_own_split_and_scores(dense_detector,
                                                                     artifact_copy):
    """With ``result.test``, ``result.scores`` and ``result.evaluation`` nothing is loaded,
    scored or evaluated again."""
    from types import SimpleNamespace

    from anomaly.evaluation import evaluate
    from anomaly.report import report_after_fit

    x = np.concatenate([make_blobs(30, seed=5), make_bars(10, seed=5)])
    classes = np.r_[np.zeros(30, int), np.ones(10, int)]
    test = SimpleNamespace(x=x, y=classes.copy(), classes=classes, class_names=None,
                           dataset="handed-over", normal_classes=(0,))
    det = _CountingScores(dense_detector)
    scores = dense_detector.decision_function(x)
    ev = evaluate(scores, classes, dense_detector.calibration_, classes)
    ev.per_class["name"] = ["the fit's normals", "the fit's anomalies"]
    result = SimpleNamespace(path=artifact_copy, detector=det, evaluation=ev, test=test,
                             scores=scores)
    page = report_after_fit(result)
    assert page == default_report_dir(artifact_copy) / "report.html"
    summary = json.loads((page.parent / "summary.json").read_text())
    assert det.score_calls == 0
    assert summary["dataset"] == "handed-over" and summary["n_test"] == 40
    table = (page.parent / "per_class.csv").read_text()
    assert "the fit's normals" in table and "the fit's anomalies" in table
    assert summary["artifact"] == str(artifact_copy.resolve())


def test_report_after_fit_warns_instead_of_failing_the_fit(dense_detector, artifact_copy,
                                                            capsys):
    """Without ``result.test`` the split is rebuilt from the artifact: here it cannot be (its
    data set 'blobs' exists nowhere), and the fit still succeeds with a warning."""
    from types import SimpleNamespace

    from anomaly.report import report_after_fit

    result = SimpleNamespace(path=artifact_copy, detector=dense_detector, evaluation=object())
    assert report_after_fit(result) is None
    err = capsys.readouterr().err
    assert "warning: the report could not be written" in err and "Expected" in err
    assert f"anomaly report {artifact_copy}" in err
    assert not default_report_dir(artifact_copy).exists()
