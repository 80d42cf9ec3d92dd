"""The whole report on a stand-in detector for 20x24 RGB images: no model to train.

The stand-in reconstructs every image as ``0.5 x + 0.25`` (so mid-grey pixels reconstruct
well and saturated ones do not), encodes an image as its mean and standard deviation, and
counts how often it is asked to score.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image

from anomaly.calibration import calibrate
from anomaly.report import FIGURES, build_report
from anomaly.report import figures as F
from anomaly.report.analysis import analyze

H, W = 20, 24


def images(n: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.5 + rng.normal(0, spread, (n, H, W, 3)), 0, 1).astype(np.float32)


class StandIn:
    model = "dense-ae"
    denoise = 0.0
    aggregation = "mean"
    score = "mse"
    seed = 0

    def __init__(self):
        self.model_ = SimpleNamespace(variational=False, code_dim=2,
                                      decode_logits=self._decode_logits)
        self.calibration_ = calibrate(self._score(images(500, 0.1, seed=1)),
                                      target_fprs=(0.01, 0.1))
        self.score_calls = 0

    @staticmethod
    def _score(x):
        return ((0.5 * x - 0.25) ** 2).reshape(len(x), -1).mean(axis=1).astype(np.float64)

    def decision_function(self, x):
        self.score_calls += 1
        return self._score(x)

    def detect(self, x, *, reconstruction=False, error_map=False, validated=False,
               operating_point=None):
        s = self._score(x)
        return SimpleNamespace(scores=s, reconstruction=0.5 * x + 0.25,
                               error_map=(0.5 * x - 0.25) ** 2,
                               is_anomaly=s > self.calibration_.get().threshold)

    def encode(self, x):
        flat = x.reshape(len(x), -1)
        return np.c_[flat.mean(axis=1), flat.std(axis=1)].astype(np.float32)

    def _decode_logits(self, z, normalize=False):
        return np.repeat(z[:, :1, None, None] * 4 - 2, H * W * 3, axis=1).reshape(-1, H, W, 3)

    def get_params(self):
        return {"score": self.score, "aggregation": self.aggregation}


def make_test_set(normal_spread: float) -> SimpleNamespace:
    x = np.concatenate([images(150, normal_spread, seed=2), images(30, 0.45, seed=3)])
    classes = np.r_[np.zeros(150, int), np.ones(30, int)]
    return SimpleNamespace(x=x, y=classes.copy(), classes=classes,
                           class_names=("grey", "loud"), dataset="colours", normal_classes=(0,))


HISTORY = {"loss": [5.0, 1.0, 0.8, 0.7], "val_loss": [4.0, 0.9, 0.85, 0.86],
           "epoch": [1.0, 2, 3, 4]}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figure_ids: list[str] = []
        self.img_alts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figure_ids.append(a["id"])
        if tag == "img":
            self.img_alts.append(a["alt"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    det, test = StandIn(), make_test_set(0.1)
    scores = det.decision_function(test.x)
    det.score_calls = 0
    rep = build_report(det, test, tmp_path_factory.mktemp("r") / "rep", scores=scores,
                       history=HISTORY, tsne_points=0)
    return det, test, rep


def test_figures_registered_written_and_shown_are_the_same(report):
    _, _, rep = report
    written = {p.name for p in rep.path.glob("*.png")}
    assert written == set(rep.figures) == set(rep.summary["figures"])
    assert written.isdisjoint(rep.notes) and written | set(rep.notes) == set(FIGURES)
    assert set(rep.notes) == {"latent_tsne.png", "manifold.png", "affine.png", "denoise.png",
                              "score_parts.png", "mask_errors.png", "decode_2x.png"}
    page = rep.html.read_text()
    parser = _Page()
    parser.feed(page)
    assert sorted(parser.figure_ids) == sorted(FIGURES[f].anchor for f in written)
    assert sorted(parser.img_alts) == sorted(FIGURES[f].title for f in written)
    for reason in rep.notes.values():
        assert str(escape(reason)) in page
    assert "denoise" in rep.notes["denoise.png"]


def test_scores_given_are_not_computed_again(report):
    det, test, rep = report
    assert det.score_calls == 0
    assert rep.summary["n_test"] == len(test.x) and rep.summary["image_shape"] == [H, W, 3]


def test_images_keep_their_shape_and_colour(report):
    det, test, _ = report
    data = analyze(det, test, tsne_points=0)
    fig = F.fig_recon(data, "typical_normal")
    k = len(data.groups["typical_normal"].x)
    original = fig.axes[0].images[0].get_array()
    assert original.shape == (H, k * W + (k - 1) * F.PAD, 3)  # RGB, 20 x 24 each
    np.testing.assert_allclose(original[:, :W], data.groups["typical_normal"].x[0], atol=1e-6)
    error = fig.axes[2].images[0].get_array()
    assert error.shape == (H, k * W + (k - 1) * F.PAD)  # channels averaged into a heat map


def test_one_colour_scale_for_every_error_map(report):
    det, test, _ = report
    data = analyze(det, test, tsne_points=0)
    top = max(float(g.error_map.max()) for g in data.groups.values())
    assert data.error_vmax == top
    clims = {F.fig_recon(data, kind).axes[2].images[0].get_clim() for kind in data.groups}
    assert clims == {(0.0, top)}
    # The normal grid alone would have had a much smaller scale.
    assert data.groups["typical_normal"].error_map.max() < 0.5 * top


def test_training_curves_mark_the_kept_epoch(report):
    _, _, rep = report
    assert rep.summary["kept_epoch"] == 3
    with Image.open(rep.figures["training.png"]) as img:
        assert img.format == "PNG"


def test_a_visible_warning_when_expected_and_measured_fpr_disagree(report, tmp_path):
    _, _, calm = report
    assert 'id="fpr-warning"' not in calm.html.read_text()
    assert all(c["agrees"] for c in calm.summary["fpr_checks"].values())
    det = StandIn()
    noisier = make_test_set(0.2)
    rep = build_report(det, noisier, tmp_path / "rep", tsne_points=0)
    assert det.score_calls == 1  # no scores given: scored once
    page = rep.html.read_text()
    assert 'id="fpr-warning"' in page and "disagree" in page
    checks = rep.summary["fpr_checks"]
    assert not any(c["agrees"] for c in checks.values())
    for c in checks.values():
        lo, hi = c["measured_ci"]
        assert lo <= c["measured_fpr"] <= hi and not lo <= c["expected_fpr"] <= hi
    assert json.loads((rep.path / "summary.json").read_text())["fpr_checks"] == json.loads(
        json.dumps(checks))


def test_mosaic_and_grid_take_any_image_shape():
    rgb = np.random.default_rng(0).uniform(size=(6, 7, 5, 3)).astype(np.float32)
    m = F.mosaic(rgb[:3], pad=2)
    assert m.shape == (7, 3 * 5 + 2 * 2, 3)
    np.testing.assert_array_equal(m[:, 7:12], rgb[1])
    g = F.grid(rgb, rows=2, cols=3)
    assert g.shape == (14, 15, 3)
    np.testing.assert_array_equal(g[7:, 5:10], rgb[4])  # row-major
    assert F.mosaic(rgb[:2, ..., :1]).shape == (7, 2 * 5 + F.PAD)  # one channel: grey


def test_no_image_size_is_written_into_the_report_code():
    src = Path(F.__file__).parent
    for path in sorted(src.glob("*.py")) + sorted(src.glob("templates/*")):
        hits = re.findall(r"(?<![\w.])(?:28|784)(?![\w.])", path.read_text())
        assert not hits, f"{path.name} assumes a 28x28 image: {hits}"


def test_pngs_are_images_of_a_sensible_size(report):
    _, _, rep = report
    for path in rep.figures.values():
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            w, h = img.size
        assert 300 <= w <= 3000 and 150 <= h <= 3000, (path.name, img.size)


@pytest.mark.parametrize(("keep", "left_out"), [
    (0, {"roc.png", "pr_normal.png", "recon_top_anomalies.png", "recon_false_negatives.png"}),
    (1, {"roc.png", "pr_normal.png", "fpr_check.png", "uniformity.png", "interpolation.png",
         "recon_typical_normal.png", "recon_false_positives.png"}),
])
def test_one_kind_of_test_image_only(tmp_path, keep, left_out):
    """All normal or all anomalous: the curves are left out with a reason, the rest is drawn."""
    full = make_test_set(0.1)
    mask = full.y == keep
    test = SimpleNamespace(**{**vars(full), "x": full.x[mask], "y": full.y[mask],
                              "classes": full.classes[mask]})
    rep = build_report(StandIn(), test, tmp_path / "rep", tsne_points=0)
    always_out = {"latent_tsne.png", "manifold.png", "affine.png", "denoise.png",
                  "score_parts.png", "training.png", "mask_errors.png", "decode_2x.png"}
    assert set(rep.notes) == always_out | left_out
    assert "all normal or all anomalous" in rep.notes["roc.png"]
    assert rep.summary["auroc"] is None and "undefined" in rep.html.read_text()
