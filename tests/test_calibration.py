"""Threshold calibration: achieved FPR, f1-max/youden against brute force, the normalized score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from anomaly.calibration import Calibration, calibrate, fpr_name, parse_fpr_name
from anomaly.errors import ConfigError, NotFoundError


def _binomial_tolerance(p: float, n_cal: int, n_test: int, sigmas: float = 4.0) -> float:
    # Both the calibration quantile and the held-out count are binomial estimates of p.
    return sigmas * math.sqrt(p * (1 - p) * (1 / n_cal + 1 / n_test))


@pytest.mark.parametrize("dist", ["gamma", "lognormal", "float32-ties"])
@pytest.mark.parametrize("target", [0.01, 0.05])
def test_achieved_fpr_on_held_out_normal_data(dist, target):
    rng = np.random.default_rng(42)
    if dist == "gamma":
        scores = rng.gamma(2.0, 1.0, 20_000)
    elif dist == "lognormal":
        scores = rng.lognormal(0.0, 1.0, 20_000)
    else:  # scores as a model produces them: float32, many exact ties
        scores = np.round(rng.normal(0.05, 0.01, 20_000), 4).astype(np.float32).astype(np.float64)
    cal_part, held_out = scores[:10_000], scores[10_000:]
    cal = calibrate(cal_part, target_fprs=(target,))
    op = cal.get()
    assert op.name == fpr_name(target) == cal.default
    assert op.target_fpr == target
    # On its own calibration data it never flags more than the target...
    assert op.expected_fpr == pytest.approx(np.mean(cal_part > op.threshold))
    assert op.expected_fpr <= target
    # ...and on held-out normal data the achieved FPR is the target within binomial noise.
    achieved = float(np.mean(cal.decide(held_out)))
    assert abs(achieved - target) <= _binomial_tolerance(target, 10_000, 10_000), achieved


def test_several_fpr_points_and_default():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=5000)
    cal = calibrate(scores, target_fprs=(0.01, 0.05, 0.1), default="fpr@5%")
    assert set(cal.operating_points) == {"fpr@1%", "fpr@5%", "fpr@10%"}
    assert cal.default == "fpr@5%"
    thresholds = [cal.operating_points[n].threshold for n in ("fpr@1%", "fpr@5%", "fpr@10%")]
    assert thresholds[0] > thresholds[1] > thresholds[2]  # a lower FPR needs a higher threshold
    assert cal.get().name == "fpr@5%"
    assert cal.get("fpr@1%").threshold == thresholds[0]


def test_threshold_convention_is_strictly_greater():
    normal = np.arange(1.0, 101.0)  # 1..100
    cal = calibrate(normal, target_fprs=(0.05,))
    thr = cal.get().threshold
    assert thr in normal  # a quantile of the normal scores
    flagged = cal.decide(np.array([thr, np.nextafter(thr, np.inf), thr - 1]))
    assert flagged.tolist() == [False, True, False]
    # "At most P%" of the normal scores lie above it, and no more than one image fewer.
    assert 0.05 - 1 / normal.size <= np.mean(normal > thr) <= 0.05


def _f1(y, flagged):
    tp = np.sum(flagged & (y == 1))
    fp = np.sum(flagged & (y == 0))
    fn = np.sum(~flagged & (y == 1))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _youden(y, flagged):
    return np.mean(flagged[y == 1]) - np.mean(flagged[y == 0])


def _brute_force(normal, anomalies, metric):
    """Best metric over every rule "score >= s" for s in the observed scores (and "flag none")."""
    y = np.r_[np.zeros(normal.size), np.ones(anomalies.size)].astype(int)
    s = np.r_[normal, anomalies]
    candidates = [metric(y, s >= t) for t in np.unique(s)] + [metric(y, np.zeros_like(y, bool))]
    return max(candidates), y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_and_youden_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Overlapping classes, float32 values with ties, as real scores are.
    normal = np.round(rng.normal(0.0, 1.0, 300), 2).astype(np.float32).astype(np.float64)
    anomalies = np.round(rng.normal(1.5, 1.0, 60), 2).astype(np.float32).astype(np.float64)
    cal = calibrate(normal, anomalies)
    assert {"fpr@1%", "f1-max", "youden"} <= set(cal.operating_points)
    assert cal.default == "fpr@1%"
    for name, metric in (("f1-max", _f1), ("youden", _youden)):
        best, y, s = _brute_force(normal, anomalies, metric)
        op = cal.get(name)
        got = metric(y, s > op.threshold)  # the project's rule: anomalous iff score > threshold
        assert got == pytest.approx(best, abs=1e-12), name
        assert op.expected_fpr == pytest.approx(np.mean(normal > op.threshold))
        assert op.expected_tpr == pytest.approx(np.mean(anomalies > op.threshold))


def test_f1_max_separable_data_flags_exactly_the_anomalies():
    normal = np.linspace(0.0, 1.0, 100)
    anomalies = np.linspace(2.0, 3.0, 10)
    cal = calibrate(normal, anomalies)
    for name in ("f1-max", "youden"):
        op = cal.get(name)
        assert op.expected_fpr == 0.0 and op.expected_tpr == 1.0, name
        assert 1.0 <= op.threshold < 2.0


def test_normalized_score_is_the_ecdf():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=1000)
    cal = calibrate(ref)
    queries = np.r_[rng.normal(size=500), ref[:20], -10.0, 10.0]
    norm = cal.normalize(queries)
    expected = np.array([np.mean(ref <= q) for q in queries])  # fraction at or below
    np.testing.assert_allclose(norm, expected, rtol=0, atol=1e-12)
    assert norm.min() >= 0.0 and norm.max() <= 1.0
    assert cal.normalize(np.array([-10.0]))[0] == 0.0
    assert cal.normalize(np.array([10.0]))[0] == 1.0
    grid = np.linspace(-4, 4, 200)
    assert np.all(np.diff(cal.normalize(grid)) >= 0)  # monotone in the score


def test_to_dict_from_dict_round_trip_through_json():
    rng = np.random.default_rng(4)
    cal = calibrate(rng.gamma(2.0, size=500), rng.gamma(6.0, size=40),
                    target_fprs=(0.01, 0.1), default="youden")
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.default == "youden"
    assert back.operating_points == cal.operating_points
    np.testing.assert_array_equal(back.reference_scores, cal.reference_scores)
    q = rng.gamma(3.0, size=100)
    np.testing.assert_array_equal(back.normalize(q), cal.normalize(q))
    for name in cal.operating_points:
        np.testing.assert_array_equal(back.decide(q, name), cal.decide(q, name))


def test_from_dict_rejects_missing_default_or_references():
    data = calibrate(np.arange(10.0)).to_dict()
    with pytest.raises(ValueError):
        Calibration.from_dict({**data, "default": "nope"})
    with pytest.raises(ValueError):
        Calibration.from_dict({**data, "reference_scores": []})


@pytest.mark.parametrize("bad", [np.array([1.0]), np.array([1.0, np.nan, 2.0]),
                                 np.array([1.0, np.inf]), np.ones((3, 2))])
def test_calibrate_rejects_bad_normal_scores(bad):
    with pytest.raises(ConfigError, match="Expected at least 2 finite"):
        calibrate(bad)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_calibrate_rejects_bad_target_fpr(fpr):
    with pytest.raises(ConfigError, match=r"target FPRs in \(0, 1\)"):
        calibrate(np.arange(100.0), target_fprs=(fpr,))


def test_calibrate_rejects_unknown_default():
    with pytest.raises(ConfigError, match="default operating point"):
        calibrate(np.arange(100.0), default="f1-max")  # no anomalies, so no f1-max point


def test_too_few_normal_scores_use_the_maximum_with_a_note(caplog):
    caplog.set_level("INFO", logger="anomaly")
    normal = np.arange(50.0)
    cal = calibrate(normal, target_fprs=(0.01,))
    assert cal.get().threshold == 49.0
    assert cal.get().expected_fpr == 0.0
    assert "cannot resolve a 1.00% FPR" in caplog.text


def test_unknown_operating_point_is_not_found():
    cal = calibrate(np.arange(100.0))
    with pytest.raises(NotFoundError, match=r"operating point in \['fpr@1%'\]"):
        cal.get("fpr@2%")


def test_fpr_names_round_trip():
    assert fpr_name(0.01) == "fpr@1%"
    assert fpr_name(0.005) == "fpr@0.5%"
    assert parse_fpr_name("fpr@5%") == pytest.approx(0.05)
    assert parse_fpr_name(fpr_name(0.005)) == pytest.approx(0.005)
    with pytest.raises(ConfigError):
        parse_fpr_name("f1-max")
