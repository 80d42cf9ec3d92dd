"""The report's statistics, on synthetic scores: no model, no plotting, milliseconds each."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, kstest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.calibration import calibrate
from anomaly.report import analysis
from anomaly.report.analysis import (
    Missing,
    bootstrap_auroc,
    clopper_pearson,
    fpr_checks,
    kept_epoch,
    ranking,
    uniformity,
)


def scores_and_labels(n_normal=400, n_anomaly=100, shift=1.5, seed=0):
    rng = np.random.default_rng(seed)
    s = np.r_[rng.normal(0, 1, n_normal), rng.normal(shift, 1, n_anomaly)]
    return s, np.r_[np.zeros(n_normal, int), np.ones(n_anomaly, int)]


def test_importing_the_report_imports_neither_matplotlib_nor_jinja2():
    code = ("import sys, anomaly.report.analysis, anomaly.report; "
            "print(sorted(m for m in ('matplotlib', 'jinja2') if m in sys.modules)); "
            "anomaly.report.figures.new_figure(1, 1); "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    # The second line shows the check can see matplotlib once a figure is drawn.
    assert out == ["[]", "True"]


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 400), (0, 1)])
def test_clopper_pearson_is_scipys_exact_interval(k, n):
    lo, hi = clopper_pearson(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert lo <= k / n <= hi


def test_clopper_pearson_shrinks_with_n_and_knows_nothing_without_data():
    widths = [np.subtract(*clopper_pearson(n // 10, n)[::-1]) for n in (20, 200, 2000)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[2] < 0.03
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    # Zero false positives in 19 images does not prove a 0% FPR: the upper bound is 17.6%.
    assert clopper_pearson(0, 19)[1] == pytest.approx(1 - 0.025 ** (1 / 19))


def test_ranking_matches_sklearn_and_partial_auroc_is_mcclish():
    s, y = scores_and_labels()
    r = ranking(y, s, seed=0, n_boot=200)
    assert r.auroc == roc_auc_score(y, s)
    assert r.partial_auroc == roc_auc_score(y, s, max_fpr=0.1)
    assert r.partial_auroc != pytest.approx(r.auroc, abs=1e-3)  # not the full AUROC again
    # McClish: random scores give 0.5, like the full AUROC, not 0.1 * 0.1 / 2.
    noise = np.random.default_rng(3).normal(size=len(y))
    assert ranking(y, noise, n_boot=50).partial_auroc == pytest.approx(0.5, abs=0.08)
    assert r.average_precision == average_precision_score(y, s)
    assert r.average_precision_normal == average_precision_score(1 - y, -s)
    assert r.normal_fraction == 0.8
    assert isinstance(ranking(np.zeros(5, int), np.arange(5.0)), Missing)


def test_bootstrap_interval_contains_the_auroc_shrinks_with_n_and_is_seeded():
    s, y = scores_and_labels()
    lo, hi = bootstrap_auroc(y, s, n_boot=300, seed=1)
    assert lo < roc_auc_score(y, s) < hi
    assert (lo, hi) == bootstrap_auroc(y, s, n_boot=300, seed=1)
    assert (lo, hi) != bootstrap_auroc(y, s, n_boot=300, seed=2)
    s_big, y_big = scores_and_labels(4000, 1000, seed=1)
    lo_b, hi_b = bootstrap_auroc(y_big, s_big, n_boot=300, seed=1)
    assert hi_b - lo_b < 0.5 * (hi - lo)


def test_weighted_auroc_with_unit_weights_is_sklearns_with_ties():
    s, y = scores_and_labels()
    s = np.round(s, 1)  # many ties
    groups = analysis._tie_groups(s)
    got = analysis._weighted_auroc(groups, y.astype(float), np.ones((1, len(y))),
                                   int(groups.max()) + 1)
    assert got[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_fpr_checks_agree_on_like_data_and_disagree_on_shifted_normals():
    rng = np.random.default_rng(0)
    cal = calibrate(rng.normal(0, 1, 2000), target_fprs=(0.01, 0.05))
    y = np.r_[np.zeros(3000, int), np.ones(50, int)]
    like = np.r_[rng.normal(0, 1, 3000), rng.normal(4, 1, 50)]
    checks = {c.name: c for c in fpr_checks(like, y, cal)}
    assert set(checks) == {"fpr@1%", "fpr@5%"} and checks["fpr@1%"].default
    c = checks["fpr@5%"]
    assert c.fp == int(np.sum(like[:3000] > c.threshold)) and c.n_normal == 3000
    assert c.measured_fpr == c.fp / 3000
    assert c.measured_ci[0] <= c.measured_fpr <= c.measured_ci[1]
    assert c.expected_ci[0] <= c.expected_fpr <= c.expected_ci[1] and c.n_val == 2000
    assert all(c.agrees for c in checks.values())
    shifted = like + np.r_[np.full(3000, 0.7), np.zeros(50)]
    assert not any(c.agrees for c in fpr_checks(shifted, y, cal))
    # Without normal test images there is nothing to measure, and no verdict.
    none = fpr_checks(like[3000:], y[3000:], cal)[0]
    assert none.measured_fpr is None and none.agrees is None


def test_uniformity_is_scipys_ks_and_tells_shifted_normals_apart():
    rng = np.random.default_rng(0)
    cal = calibrate(rng.normal(0, 1, 1000))
    same = uniformity(rng.normal(0, 1, 500), cal)
    shifted = uniformity(rng.normal(0.5, 1, 500), cal)
    assert same.ks_statistic == pytest.approx(kstest(same.normalized, "uniform").statistic)
    assert same.ks_statistic < 0.1 < 0.15 < shifted.ks_statistic
    # The reference is a sample too: only the two-sample test leaves like normals unflagged.
    assert same.ks2_pvalue > 0.01 > shifted.ks2_pvalue
    assert same.ks2_pvalue > same.ks_pvalue
    assert isinstance(uniformity(np.array([0.5, 0.2]), cal), Missing)


def test_kept_epoch_is_the_lowest_validation_loss_in_absolute_epochs():
    hist = pd.DataFrame({"loss": [9.0, 3, 2, 1.5, 1.4], "val_loss": [8.0, 3, 1.9, 2.0, 2.1],
                         "epoch": [4.0, 5, 6, 7, 8]})  # a resumed run starts at epoch 4
    assert kept_epoch(hist) == 6
    assert kept_epoch(hist.drop(columns="epoch")) == 3
    assert kept_epoch(hist.drop(columns="val_loss")) is None


def test_kmeans_ari_tells_separated_clusters_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    assert analysis._kmeans_ari(centres[labels] + rng.normal(0, 1, (150, 2)), labels, 3, 0) == 1.0
    noise = analysis._kmeans_ari(rng.normal(0, 1, (150, 2)), labels, 3, 0)
    assert abs(noise) < 0.1


@pytest.mark.parametrize("shape", [(4, 28), (4, 10, 10, 2), (0, 10, 10)])
def test_bad_test_images_are_refused_in_keras_style(shape):
    class T:
        x = np.zeros(shape, np.float32)
        y = classes = np.zeros(shape[0], int)

    with pytest.raises(ValueError, match=r"^Expected test images of shape .* Received: shape"):
        analysis.check_test_set(T, None)


def test_scores_of_the_wrong_length_are_refused():
    class T:
        x = np.zeros((4, 6, 6), np.float32)
        y = classes = np.zeros(4, int)

    with pytest.raises(ValueError, match=r"Expected finite scores of shape \(4,\)"):
        analysis.check_test_set(T, np.zeros(3))
