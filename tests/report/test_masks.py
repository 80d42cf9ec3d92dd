"""The error-map-over-mask figure and the pixel metrics of data sets with ground-truth masks.

The stand-in detector of ``test_build`` (reconstruction ``0.5 x + 0.25``, so its error is
largest on saturated pixels, which is what the painted defects are) on a tiny MVTec AD folder
written by ``bench/synthetic_mvtec.py`` at 32x32; one tiny dense autoencoder fitted through
``anomaly fit`` for the way masks travel from the folder to both kinds of report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest

from anomaly.data.layouts import load_mvtec
from anomaly.data.splits import TestSet
from anomaly.localization import pixel_metrics
from anomaly.report import analysis, build_report, report_for_artifact
from anomaly.report import figures as F
from anomaly.report.analysis import MaskSet, Missing, analyze
from bench.synthetic_mvtec import generate
from tests.report.test_build import StandIn

SIZE = 32
DEFECTS = ("scratch", "spot", "missing")


class MaskStandIn(StandIn):
    """The stand-in, decoding at the folder's 32x32 RGB."""

    def _decode_logits(self, z, normalize=False):
        return np.repeat(z[:, :1, None, None] * 4 - 2, SIZE * SIZE * 3, axis=1).reshape(
            -1, SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("mvtec") / "cat", n_train=40, n_test_good=8,
                    n_test_defect=5, size=(SIZE, SIZE), seed=3, defects=DEFECTS)
    (root / "ground_truth" / "spot" / "0001_mask.png").unlink()  # one defect without a mask
    return root


@pytest.fixture(scope="module")
def mvtec_test(mvtec_root) -> TestSet:
    mv = load_mvtec(mvtec_root)
    return TestSet(mv.x_test, (mv.classes > 0).astype(np.int64), mv.classes, mv.class_names,
                   "cat", (0,), mv.masks, mv.has_mask)


@pytest.fixture(scope="module")
def data(mvtec_test):
    return analyze(MaskStandIn(), mvtec_test, tsne_points=0)


def _index_of(test, image) -> int:
    hits = [i for i in range(len(test.x)) if np.array_equal(test.x[i], image)]
    assert len(hits) == 1
    return hits[0]


def test_the_highest_and_median_scored_image_of_each_defect_type_with_its_own_mask(
        mvtec_test, data):
    m = data.mask_errors
    assert isinstance(m, MaskSet)
    names = mvtec_test.class_names
    assert [d.split(": ")[1] for d in m.defects] == [n for n in names[1:] for _ in (0, 1)]
    assert m.picks == ["highest", "median"] * len(DEFECTS)
    det = MaskStandIn()
    scores = det.decision_function(mvtec_test.x)
    for j in range(len(m.x)):
        i = _index_of(mvtec_test, m.x[j])
        # The figure's mask is the ground truth of that very image, at its size.
        np.testing.assert_array_equal(m.masks[j], mvtec_test.masks[i])
        assert m.masks[j].any() and mvtec_test.has_mask[i]
        c = mvtec_test.classes[i]
        assert names[c] == m.defects[j].split(": ")[1]
        mine = np.flatnonzero((mvtec_test.classes == c) & mvtec_test.has_mask)
        ranked = mine[np.argsort(-scores[mine], kind="stable")]
        assert i == (ranked[0] if m.picks[j] == "highest" else ranked[len(ranked) // 2])
        assert m.scores[j] == pytest.approx(scores[i])
    # The spot image without a mask is never picked: there is no outline to draw for it.
    assert mvtec_test.has_mask.sum() == len(mvtec_test.x) - 1


def _outline_vertices(fig) -> np.ndarray:
    (cs,) = [c for c in fig.axes[2].collections if hasattr(c, "levels")]
    assert list(cs.levels) == [0.5]
    return np.concatenate([p.vertices for p in cs.get_paths() if len(p.vertices)])


def test_the_outline_is_drawn_from_the_masks(data):
    fig = F.fig_mask_errors(data)
    m = data.mask_errors
    assert fig.axes[2].images[0].get_array().shape == (SIZE, len(m.x) * (SIZE + F.PAD) - F.PAD)
    field = F.mosaic(m.masks, fill=0.0) > 0.5
    verts = _outline_vertices(fig)
    # A 0.5 contour of a 0/1 field runs half-way between a defect and a background pixel.
    for x, y in verts.tolist():
        if abs(x - round(x)) < 1e-6:  # on a pixel column, between two rows
            a, b = field[math.floor(y), round(x)], field[math.ceil(y), round(x)]
        else:
            assert abs(y - round(y)) < 1e-6, (x, y)
            a, b = field[round(y), math.floor(x)], field[round(y), math.ceil(x)]
        assert a != b, (x, y)
    # Every image of the figure has its outline, inside its own column.
    col = np.round((verts[:, 0] - (SIZE - 1) / 2) / (SIZE + F.PAD)).astype(int)
    assert set(col) == set(range(len(m.x)))


def test_a_different_mask_moves_the_outline(data):
    """A square mask of known place gives an outline around exactly that square."""
    m = data.mask_errors
    square = np.zeros_like(m.masks)
    square[:, 5:11, 8:15] = True
    fig = F.fig_mask_errors(dataclasses.replace(data, mask_errors=dataclasses.replace(
        m, masks=square)))
    verts = _outline_vertices(fig)
    first = verts[verts[:, 0] < SIZE]
    assert first[:, 0].min() == pytest.approx(7.5) and first[:, 0].max() == pytest.approx(14.5)
    assert first[:, 1].min() == pytest.approx(4.5) and first[:, 1].max() == pytest.approx(10.5)


def test_pixel_metrics_and_detection_rates_per_defect_type(mvtec_test, tmp_path):
    det = MaskStandIn()
    rep = build_report(det, mvtec_test, tmp_path / "rep", tsne_points=0)
    assert "mask_errors.png" in rep.figures and "mask_errors.png" not in rep.notes
    x = mvtec_test.x
    maps = ((0.5 * x - 0.25) ** 2).mean(axis=-1)  # the stand-in's error, channels averaged
    want = pixel_metrics(maps, mvtec_test.masks, mvtec_test.has_mask)
    assert rep.summary["pixel"] == pytest.approx(want)
    assert want["n_images_without_mask"] == 1 and 0.5 < want["pixel_auroc"] < 1
    scores = det.decision_function(x)
    threshold = rep.summary["threshold"]
    rows = {r["name"]: r for r in rep.summary["per_defect"]}
    assert set(rows) == set(DEFECTS)
    for name, r in rows.items():
        c = mvtec_test.class_names.index(name)
        mine = mvtec_test.classes == c
        assert r["n"] == mine.sum() == 5
        assert r["detected"] == int(np.sum(scores[mine] > threshold))
        assert r["detection_rate"] == pytest.approx(r["detected"] / r["n"])
        keep = (mine | (mvtec_test.classes == 0)) & mvtec_test.has_mask
        assert r["pro"] == pytest.approx(pixel_metrics(maps[keep], mvtec_test.masks[keep])["pro"])
    page = rep.html.read_text()
    assert 'id="localization"' in page and "pixel AUROC" in page
    assert f"{want['pro']:.4f}" in page
    assert json.loads((rep.path / "summary.json").read_text())["pixel"] == pytest.approx(want)


def test_without_masks_the_figure_is_left_out_with_a_note(tmp_path):
    from tests.report.test_build import make_test_set

    rep = build_report(StandIn(), make_test_set(0.1), tmp_path / "rep", tsne_points=0)
    assert "mask_errors.png" not in rep.figures
    assert "no ground-truth masks" in rep.notes["mask_errors.png"]
    assert "pixel" not in rep.summary and "per_defect" not in rep.summary
    assert 'id="localization"' in rep.html.read_text()  # the heading, with the note


def test_masks_without_defect_pixels_leave_the_figure_out(mvtec_test):
    empty = dataclasses.replace(mvtec_test, masks=np.zeros_like(mvtec_test.masks))
    data = analyze(MaskStandIn(), empty, tsne_points=0)
    assert isinstance(data.mask_errors, Missing)
    assert "no anomalous test image has a ground-truth mask with defect pixels" in \
        data.mask_errors.reason.lower()
    assert data.pixel["pixel_auroc"] is None and data.pixel["pro"] is None


def test_masks_of_another_size_are_refused(mvtec_test):
    bad = dataclasses.replace(mvtec_test, masks=mvtec_test.masks[:, :-1])
    with pytest.raises(ValueError, match=r"Expected ground-truth masks of shape \(23, 32, 32\)"):
        analysis.check_test_set(bad, None)


def test_fit_and_report_carry_the_masks_from_the_folder(mvtec_root, tmp_path, monkeypatch):
    """``anomaly fit`` hands its evaluation (pixel metrics included) to its report, which
    scores no error map again; ``anomaly report`` rebuilds the split, masks included."""
    from anomaly.cli import main

    calls = []
    real = analysis._add_pixel_metrics
    monkeypatch.setattr(analysis, "_add_pixel_metrics",
                        lambda *a: calls.append(1) or real(*a))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["fit", "--dataset", str(mvtec_root), "--model", "dense-ae", "--hidden", "16",
                   "--latent-dim", "4", "--epochs", "1", "--batch-size", "16",
                   "--force-calibration", "--quiet", "--output", str(tmp_path / "models"),
                   "--name", "cat"])
    assert rc == 0, out.getvalue()
    artifact = next((tmp_path / "models" / "cat").iterdir())
    metrics = json.loads((artifact / "metrics.json").read_text())
    fit_folder = tmp_path / "models" / "_reports" / "cat" / artifact.name
    fit_summary = json.loads((fit_folder / "summary.json").read_text())
    assert "mask_errors.png" in fit_summary["figures"]
    assert fit_summary["pixel"] == metrics["pixel"] and calls == []
    rep = report_for_artifact(artifact, tmp_path / "again", tsne_points=0)
    assert "mask_errors.png" in rep.figures and calls == [1]
    assert rep.summary["pixel"] == pytest.approx(metrics["pixel"])
    assert rep.summary["pixel"]["n_images_without_mask"] == 1
