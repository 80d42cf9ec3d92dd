"""Evaluation: AUROC/AP as scikit-learn computes them, confusion counts, the per-class table."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.calibration import calibrate
from anomaly.evaluation import evaluate, format_report, point_metrics


@pytest.fixture
def labelled():
    """Scores of 3 classes: class 0 normal, classes 1 and 2 anomalies (2 is easier)."""
    rng = np.random.default_rng(0)
    classes = np.r_[np.zeros(300, int), np.ones(100, int), np.full(100, 2)]
    scores = np.r_[rng.normal(0, 1, 300), rng.normal(1.5, 1, 100), rng.normal(4, 1, 100)]
    y = (classes != 0).astype(int)
    cal = calibrate(rng.normal(0, 1, 2000), rng.normal(2, 1, 50), target_fprs=(0.01, 0.05))
    return scores, y, classes, cal


def test_auroc_and_ap_equal_sklearn(labelled):
    scores, y, classes, cal = labelled
    m = evaluate(scores, y, cal, classes).metrics
    assert m["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert m["n_test"] == 500 and m["n_anomalies"] == 200
    assert m["default_operating_point"] == "fpr@1%"
    assert set(m["operating_points"]) == {"fpr@1%", "fpr@5%", "f1-max", "youden"}


def test_operating_point_confusion_counts(labelled):
    scores, y, classes, cal = labelled
    m = evaluate(scores, y, cal, classes).metrics
    for name, op in cal.operating_points.items():
        got = m["operating_points"][name]
        flagged = scores > op.threshold
        tp = int(np.sum(flagged & (y == 1)))
        fp = int(np.sum(flagged & (y == 0)))
        fn = int(np.sum(~flagged & (y == 1)))
        tn = int(np.sum(~flagged & (y == 0)))
        assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (tn, fp, fn, tp), name
        assert got["threshold"] == op.threshold
        assert got["precision"] == pytest.approx(tp / (tp + fp))
        assert got["recall"] == pytest.approx(tp / (tp + fn))
        assert got["fpr"] == pytest.approx(fp / (fp + tn))
        assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert got["expected_fpr"] == op.expected_fpr


def test_point_metrics_edge_cases():
    y = np.array([0, 0, 1, 1])
    none = point_metrics(y, np.zeros(4, bool))
    assert (none["tn"], none["fp"], none["fn"], none["tp"]) == (2, 0, 2, 0)
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0
    everything = point_metrics(y, np.ones(4, bool))
    assert everything["fpr"] == 1.0 and everything["recall"] == 1.0
    assert everything["precision"] == 0.5
    perfect = point_metrics(y, y.astype(bool))
    assert perfect["f1"] == 1.0 and perfect["fpr"] == 0.0


def test_per_class_table(labelled):
    scores, y, classes, cal = labelled
    names = ("zero", "one", "two")
    table = evaluate(scores, y, cal, classes, names).per_class
    assert table["class"].tolist() == [0, 1, 2]
    assert table["name"].tolist() == list(names)
    assert table["role"].tolist() == ["normal", "anomaly", "anomaly"]
    assert table["n"].tolist() == [300, 100, 100]
    for _, row in table.iterrows():
        mask = classes == row["class"]
        assert row["mean_score"] == pytest.approx(scores[mask].mean())
        for name, op in cal.operating_points.items():
            assert row[f"flagged@{name}"] == pytest.approx(np.mean(scores[mask] > op.threshold))
    # The easier anomaly class is detected more often at the default point.
    rates = table.set_index("class")["flagged@fpr@1%"]
    assert rates[2] > rates[1] > rates[0]


def test_per_class_without_classes_uses_normal_and_anomaly(labelled):
    scores, y, _, cal = labelled
    table = evaluate(scores, y, cal).per_class
    assert table["name"].tolist() == ["normal", "anomaly"]
    assert table["n"].tolist() == [300, 200]


def test_single_class_test_set_has_no_auroc(labelled):
    scores, _, _, cal = labelled
    m = evaluate(scores[:300], np.zeros(300, int), cal).metrics
    assert m["auroc"] is None and m["average_precision"] is None
    assert m["operating_points"]["fpr@1%"]["fpr"] == pytest.approx(
        np.mean(scores[:300] > cal.get().threshold))


def test_format_report_lists_every_point_and_class(labelled):
    scores, y, classes, cal = labelled
    ev = evaluate(scores, y, cal, classes, ("zero", "one", "two"))
    text = format_report(ev)
    assert f"AUROC {ev.metrics['auroc']:.4f}" in text
    for name in cal.operating_points:
        assert name in text
    assert "fpr@1%*" in text  # the default is marked
    assert "score > threshold" in text
    for name in ("zero", "one", "two"):
        assert name in text
