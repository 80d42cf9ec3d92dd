"""The 2x decoding figure: an affine-vae's coordinate decoder on a finer grid; other models
leave it out with a note. Tiny models of the session (2 epochs on 28x28 blobs, seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from anomaly.report import FIGURES, build_report
from anomaly.report import figures as F
from anomaly.report.analysis import DECODE_SCALE, Upscaled, analyze
from anomaly.report.figures import render
from tests.conftest import make_bars, make_blobs


@pytest.fixture(scope="module")
def test_set():
    x = np.concatenate([make_blobs(30, seed=5), make_bars(10, seed=5)])
    classes = np.r_[np.zeros(30, int), np.ones(10, int)]
    return SimpleNamespace(x=x, y=classes.copy(), classes=classes, class_names=("blob", "bar"),
                           dataset="shapes", normal_classes=(0,))


def test_affine_vae_decodes_at_2x_and_the_figure_shows_it_unresized(fitted, test_set):
    det = fitted("affine-vae")
    data = analyze(det, test_set, tsne_points=0)
    u = data.upscaled
    assert isinstance(u, Upscaled) and u.scale == DECODE_SCALE == 2
    k = len(u.x)
    assert k == 4 and u.upscaled.shape == (k, 56, 56) and u.reconstruction.shape == (k, 28, 28)
    # Typical normal images and the top anomalies, as the reconstruction grids pick them.
    picked = np.r_[data.groups["typical_normal"].x[:2], data.groups["top_anomalies"].x[:2]]
    np.testing.assert_array_equal(u.x, picked)
    np.testing.assert_allclose(u.upscaled, det.reconstruct(u.x, scale=2), atol=1e-6)
    np.testing.assert_allclose(u.reconstruction, det.reconstruct(u.x), atol=1e-6)
    fig = F.fig_upscaled(data)
    shown = [ax.images[0].get_array() for ax in fig.axes[:3]]
    assert [a.shape for a in shown] == [(28, 28), (28, 28), (56, 56)]
    np.testing.assert_allclose(shown[2], np.clip(u.upscaled[0], 0, 1), atol=1e-6)
    # Panels of one size: the 2x is drawn at its own resolution, not shrunk to 28x28.
    boxes = [ax.get_position() for ax in fig.axes[:3]]
    assert boxes[2].width == pytest.approx(boxes[1].width, rel=0.02)
    width_px = boxes[2].width * fig.get_figwidth() * F.DPI
    assert width_px >= 56
    assert "interpolation" in FIGURES["decode_2x.png"].caption
    assert isinstance(render(FIGURES["decode_2x.png"], data), bytes)


def test_other_models_leave_the_2x_figure_out_with_a_note(fitted, test_set, tmp_path):
    rep = build_report(fitted("conv-vae"), test_set, tmp_path / "rep", tsne_points=0)
    assert "decode_2x.png" not in rep.figures and not (rep.path / "decode_2x.png").exists()
    note = rep.notes["decode_2x.png"]
    assert "affine-vae" in note and "conv-vae decodes at its training size only" in note
    assert "conv-vae decodes at its training size only" in rep.html.read_text()
    with pytest.raises(ValueError, match="affine-vae"):  # what the note stands in for
        fitted("conv-vae").reconstruct(test_set.x[:1], scale=2)
