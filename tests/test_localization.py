"""Pixel AUROC and PRO against values computed by hand on tiny masks, and their place in the
evaluation of an MVTec AD folder (metrics.json, per_class.csv)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.localization import pixel_auroc, pixel_metrics, pro_curve, pro_score, regions


def test_pixel_auroc_by_hand():
    # positives 0.95, 0.85, 0.45 against negatives 0.0..0.9: 10 + 9 + 5 of 30 pairs ranked.
    scores = np.array([[0.95, 0.85, 0.45, *np.arange(10) / 10]])
    mask = np.array([[True] * 3 + [False] * 10])
    assert pixel_auroc(scores, mask) == pytest.approx(24 / 30)
    assert pixel_auroc(scores, np.zeros_like(mask)) is None


def _two_regions():
    """Image 0: background 0.0..0.4 then region A (0.95, 0.45); image 1: background 0.5..0.9
    then region B (0.85). One row each, so A is one region of two pixels."""
    maps = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.95, 0.45],
                     [0.5, 0.6, 0.7, 0.8, 0.9, 0.85, 0.0]])[:, None, :]
    masks = np.array([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 0]], bool)[:, None, :]
    has = np.ones(2, bool)
    # image 1's last pixel is background too (score 0.0): 11 background pixels.
    return maps, masks, has


def test_pro_by_hand():
    maps, masks, _ = _two_regions()
    labels, n = regions(masks)
    assert n == 2 and set(np.unique(labels)) == {0, 1, 2}
    # Background: 11 pixels (0.0 twice, 0.1..0.9). Descending thresholds:
    #   0.95: A half found -> PRO 0.25, FPR 0
    #   0.9:  FPR 1/11;  0.85: B found -> PRO 0.75;  0.8, 0.7: FPR 2/11, 3/11;
    #   0.6:  FPR 4/11 > 0.3, so the curve is cut at 0.3, on the flat PRO = 0.75 stretch.
    # Area = 0.25 * 1/11 + 0.75 * (0.3 - 1/11); normalized by 0.3.
    want = (0.25 / 11 + 0.75 * (0.3 - 1 / 11)) / 0.3
    assert pro_score(maps, masks) == pytest.approx(want)
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
    # Each region weighs the same whatever its size: B (1 pixel) counts as much as A (2).
    assert pro[np.searchsorted(fpr, 1 / 11)] == pytest.approx(0.25)


def test_pro_interpolates_at_the_fpr_limit():
    # Two background pixels (0.0, 1.0) and one defect pixel tied at 1.0: the curve goes
    # straight from (0, 0) to (0.5, 1); at FPR 0.3 the PRO is 0.6, the area 0.09, / 0.3 = 0.3.
    maps = np.array([[[0.0, 1.0, 1.0]]])
    masks = np.array([[[False, False, True]]])
    assert pro_score(maps, masks) == pytest.approx(0.3)
    assert pro_score(maps, masks, fpr_limit=1.0) == pytest.approx(0.75)


def test_pro_perfect_and_inverted_maps():
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4, 4] = True
    good = masks.astype(float)
    assert pro_score(good, masks) == pytest.approx(1.0)
    assert pixel_auroc(good, masks) == pytest.approx(1.0)
    assert pro_score(1 - good, masks) == pytest.approx(0.0)


def test_regions_use_8_connectivity_per_image():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True      # diagonal neighbours: one region
    masks[0, 3, 3] = True                       # a second one
    masks[1, 0, 0] = True                       # same place, other image: a third
    labels, n = regions(masks)
    assert n == 3 and labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 3, 3]
    assert labels[1, 0, 0] not in (0, labels[0, 0, 0], labels[0, 3, 3])


def test_random_maps_score_about_chance():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 32, 32), bool)
    for i in range(20):
        y, x = rng.integers(0, 24, 2)
        masks[i, y:y + 6, x:x + 6] = True
    maps = rng.random(masks.shape)
    assert pixel_auroc(maps, masks) == pytest.approx(0.5, abs=0.02)
    assert pro_score(maps, masks) == pytest.approx(0.15, abs=0.02)


def test_pixel_metrics_skip_images_without_masks_and_take_colour_maps():
    maps, masks, has = _two_regions()
    has = np.array([True, False])
    out = pixel_metrics(maps, masks, has)
    assert out["n_images"] == 1 and out["n_images_without_mask"] == 1 and out["n_regions"] == 1
    # Image 0 alone: A (0.95, 0.45) against background 0.0..0.4: every pair ranked right.
    assert out["pixel_auroc"] == pytest.approx(1.0)
    colour = np.repeat(maps[..., None], 3, axis=-1)
    assert pixel_metrics(colour, masks) == pixel_metrics(maps, masks)
    assert pixel_metrics(maps, np.zeros_like(masks))["pro"] is None


def test_bad_shapes_are_clear_errors():
    with pytest.raises(DataError, match=r"Expected error maps .* of the same size. Received: "
                                         r"shapes \(1, 4, 4\) and \(1, 4, 5\)"):
        pixel_auroc(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))
    with pytest.raises(DataError, match="no defect pixels"):
        pro_score(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))


def test_fit_on_an_mvtec_folder_reports_pixel_metrics(tmp_path):
    from anomaly.config import resolve
    from anomaly.pipeline import run_evaluate, run_fit
    from bench.synthetic_mvtec import generate

    root = generate(tmp_path / "cat", n_train=40, n_test_good=6, n_test_defect=3,
                    size=(24, 24), seed=1)
    (root / "ground_truth" / "spot" / "0002_mask.png").unlink()
    cfg = resolve(None, {"dataset": str(root), "model": "dense-ae", "hidden": [16],
                         "latent_dim": 4, "epochs": 1, "batch_size": 16,
                         "force_calibration": True, "output": str(tmp_path / "models")})
    res = run_fit(cfg, verbose=0)
    metrics = json.loads((res.path / "metrics.json").read_text())
    px = metrics["pixel"]
    assert px["n_images"] == 6 + 4 * 3 - 1 and px["n_images_without_mask"] == 1
    assert 0 < px["pixel_auroc"] < 1 and 0 < px["pro"] < 1 and px["pro_fpr_limit"] == 0.3
    table = pd.read_csv(res.path / "per_class.csv")
    assert table["name"].tolist() == ["good", "colour", "missing", "scratch", "spot"]
    assert table.loc[0, ["pixel_auroc", "pro"]].isna().all()
    assert table.loc[1:, "pro"].notna().all()
    # Evaluating the saved artifact rebuilds the same split, masks included.
    _, ev = run_evaluate(res.path)
    assert ev.metrics["pixel"] == pytest.approx(px)
    from anomaly.evaluation import format_report

    text = format_report(ev)
    assert "pixel AUROC" in text and "1 anomalous image(s) without a mask" in text
