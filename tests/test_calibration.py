"""Threshold calibration: promises that hold on new data, their intervals and checks, the tail
model, recalibration, and f1-max/youden against brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from anomaly.calibration import (
    Calibration,
    OperatingPoint,
    calibrate,
    check_measured_fpr,
    clopper_pearson,
    estimate_optimism,
    fpr_name,
    parse_fpr_name,
    recalibrate,
    required_reference,
)
from anomaly.errors import ConfigError, NotFoundError

N_REF = 592  # the issue's hold-out: 10% of MNIST's training zeros
DIST = stats.gamma(2.0)  # right-skewed like reconstruction errors; known survival function


def _draws(n_draws: int, n: int, seed: int) -> np.ndarray:
    return DIST.rvs(size=(n_draws, n), random_state=np.random.default_rng(seed))


# -- promises that hold on new data ---------------------------------------------------------


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_conformal_fpr_and_interval_over_many_reference_sets(target):
    draws = _draws(2000, N_REF, seed=int(target * 1000))
    n_above = N_REF - math.ceil((N_REF + 1) * (1 - target))  # ranks above the order statistic
    true_fpr, covered = [], []
    for ref in draws:
        op = calibrate(ref, target_fprs=(target,)).get()
        assert op.reference_flagged == n_above and op.n_reference == N_REF
        fpr = DIST.sf(op.threshold)  # the exact FPR on new normal data of this distribution
        true_fpr.append(fpr)
        covered.append(op.fpr_interval[0] <= fpr <= op.fpr_interval[1])
    true_fpr = np.array(true_fpr)
    # The true FPR of the order statistic is Beta(x + 1, n - x): its mean is expected_fpr...
    beta = stats.beta(n_above + 1, N_REF - n_above)
    assert op.expected_fpr == pytest.approx(beta.mean(), rel=1e-12)
    assert op.expected_fpr <= target
    assert abs(true_fpr.mean() - beta.mean()) < 4 * beta.std() / math.sqrt(len(draws))
    # ...and the Clopper-Pearson interval covers it at a rate we can compute exactly (>= 95%).
    lo, hi = clopper_pearson(n_above, N_REF)
    exact = beta.cdf(hi) - beta.cdf(lo)
    assert exact >= 0.95
    assert abs(np.mean(covered) - exact) < 4 * math.sqrt(exact * (1 - exact) / len(draws))


def test_pac_rule_keeps_fpr_below_target_at_its_confidence():
    target, confidence = 0.05, 0.9
    draws = _draws(2000, N_REF, seed=5)
    below = [DIST.sf(calibrate(r, target_fprs=(target,), rule="pac").get().threshold) <= target
             for r in draws]
    k = int(stats.binom.ppf(confidence, N_REF, 1 - target)) + 1
    exact = stats.binom.cdf(k - 1, N_REF, 1 - target)  # P(Beta(n + 1 - k, k) <= target)
    assert exact >= confidence
    assert abs(np.mean(below) - exact) < 4 * math.sqrt(exact * (1 - exact) / len(draws))


def test_smooth_rule_is_unbiased_and_less_noisy_than_conformal():
    target = 0.01
    draws = _draws(300, N_REF, seed=6)
    smooth, conformal, covered, on_target = [], [], [], []
    for ref in draws:
        op = calibrate(ref, target_fprs=(target,), rule="smooth").get()
        smooth.append(DIST.sf(op.threshold))
        covered.append(op.fpr_interval[0] <= smooth[-1] <= op.fpr_interval[1])
        # The model's threshold, unless the reference contradicts it (then raised, lower p).
        assert op.expected_fpr <= target * (1 + 1e-9)
        on_target.append(op.expected_fpr == pytest.approx(target, rel=1e-9))
        conformal.append(DIST.sf(calibrate(ref, target_fprs=(target,)).get().threshold))
    smooth, conformal = np.array(smooth), np.array(conformal)
    assert np.mean(on_target) > 0.9
    assert 0.9 * target < smooth.mean() < 1.15 * target
    assert conformal.mean() < 0.9 * target  # rounds down to floor(593 * 1%) = 5 ranks
    assert smooth.std() < conformal.std()
    assert np.mean(covered) >= 0.95


def test_measured_fpr_check_warns_at_its_level_when_nothing_changed():
    target, n_test = 0.01, 1000
    draws = _draws(2000, N_REF + n_test, seed=7)
    outside = []
    for row in draws:
        op = calibrate(row[:N_REF], target_fprs=(target,)).get()
        outside.append(check_measured_fpr(op, int(np.sum(row[N_REF:] > op.threshold)),
                                          n_test).outside)
    # Under exchangeability the count flagged is exactly beta-binomial: the exact warning rate.
    x = op.reference_flagged
    pmf = stats.betabinom(n_test, x + 1, N_REF - x).pmf(np.arange(n_test + 1))
    warns = np.array([check_measured_fpr(op, m, n_test).outside for m in range(n_test + 1)])
    exact = float(pmf[warns].sum())
    assert 0.01 < exact <= 0.05
    assert abs(np.mean(outside) - exact) < 4 * math.sqrt(exact * (1 - exact) / len(draws))


def test_measured_fpr_check_flags_a_real_change_and_reports_ranges():
    ref = _draws(1, 5000, seed=8)[0]
    op = calibrate(ref, target_fprs=(0.01,)).get()
    ok = check_measured_fpr(op, 10, 1000)
    assert not ok.outside and ok.measured_fpr == 0.01
    assert ok.predicted_range[0] < 0.01 < ok.predicted_range[1]
    assert ok.measured_interval == clopper_pearson(10, 1000)
    bad = check_measured_fpr(op, 40, 2000)  # twice the promise on 2000 images
    assert bad.outside and bad.p_value < 0.01
    assert bad.message().startswith("fpr@1%: measured FPR 2.00% (40 of 2000 normal images) is "
                                    "outside the 95% range")
    assert ok.predicted_fpr == pytest.approx(op.expected_fpr)
    # The issue's case: 592 references and 1.94% of 980 test zeros is within the noise of a
    # threshold taken from 592 images; a plain binomial test against 1.01% would warn.
    issue = calibrate(_draws(1, N_REF, seed=9)[0], target_fprs=(0.01,)).get()
    assert not check_measured_fpr(issue, 19, 980).outside
    assert stats.binomtest(19, 980, 6 / 593).pvalue < 0.05
    # The same case read from a format-1 calibration.json (x = 5 of 592 above X_(587)).
    old = OperatingPoint("fpr@1%", 1.0, "normal-quantile", 5 / 592, None, 0.01, 592,
                         clopper_pearson(5, 592), 5)
    check = check_measured_fpr(old, 19, 980)
    assert not check.outside and check.predicted_fpr == pytest.approx(6 / 593)
    assert check.predicted_range[0] < 0.01 < check.predicted_range[1]
    # Hand-made points without n_reference get the plain binomial test.
    plain = OperatingPoint("fpr@1%", 1.0, "manual", 0.01)
    assert check_measured_fpr(plain, 19, 980).outside


@pytest.mark.parametrize("flagged, n", [(-1, 10), (11, 10), (0, 0), (1.5, 10), (True, 10)])
def test_measured_fpr_check_rejects_bad_counts(flagged, n):
    op = calibrate(np.arange(1000.0)).get()
    with pytest.raises(ConfigError, match="Expected"):
        check_measured_fpr(op, flagged, n)


@pytest.mark.parametrize("rule", ["conformal", "smooth"])
@pytest.mark.parametrize("dist", ["gamma", "float32-ties"])
def test_held_out_normal_data_agrees_with_the_promise(dist, rule):
    rng = np.random.default_rng(42)
    if dist == "gamma":
        scores = rng.gamma(2.0, 1.0, 20_000)
    else:  # scores as a model produces them: float32, many exact ties
        scores = np.round(rng.normal(0.05, 0.01, 20_000), 4).astype(np.float32).astype(np.float64)
    cal_part, held_out = scores[:10_000], scores[10_000:]
    cal = calibrate(cal_part, target_fprs=(0.01, 0.05), rule=rule)
    for target in (0.01, 0.05):
        op = cal.get(fpr_name(target))
        assert op.target_fpr == target
        x = int(np.sum(cal_part > op.threshold))
        assert op.reference_flagged == x
        assert op.fpr_interval[0] <= target <= op.fpr_interval[1]
        promised = {"conformal": (x + 1) / 10_001, "smooth": target}[rule]
        assert op.expected_fpr == pytest.approx(promised, rel=1e-9)
        assert op.expected_fpr <= target * (1 + 1e-9)
        flagged = int(np.sum(cal.decide(held_out, op.name)))
        assert not check_measured_fpr(op, flagged, held_out.size).outside, flagged


def test_optimism_correction_repairs_an_optimistic_reference():
    rng = np.random.default_rng(10)
    train = rng.normal(-0.3, 1.0, 5000)  # in-sample: 0.3 lower than fresh normal scores
    holdout = rng.normal(0.0, 1.0, 600)
    fresh = stats.norm()
    naive = calibrate({"holdout": holdout, "train": train}).get()
    shift = estimate_optimism(train, holdout)
    assert 0.15 < shift < 0.45
    fixed_cal = calibrate({"holdout": holdout, "train": train}, optimism={"train": shift})
    fixed = fixed_cal.get()
    assert fresh.sf(naive.threshold) > naive.fpr_interval[1]  # the promise breaks...
    assert fixed.fpr_interval[0] <= fresh.sf(fixed.threshold) <= fixed.fpr_interval[1]
    assert fixed_cal.sources == {"holdout": {"n": 600, "optimism": 0.0},
                                 "train": {"n": 5000, "optimism": shift}}
    np.testing.assert_array_equal(fixed_cal.reference_scores,
                                  np.sort(np.r_[holdout, train + shift]))


def test_bad_sources_and_optimism_are_config_errors():
    with pytest.raises(ConfigError, match=r"optimism for sources in \['a'\]"):
        calibrate({"a": np.arange(100.0)}, optimism={"b": 1.0})
    with pytest.raises(ConfigError, match="finite optimism"):
        calibrate(np.arange(100.0), optimism=float("nan"), force=True)
    with pytest.raises(ConfigError, match="source 'b'"):
        calibrate({"a": np.arange(100.0), "b": [1.0, np.inf]}, force=True)
    with pytest.raises(ConfigError, match="threshold rule"):
        calibrate(np.arange(1000.0), rule="quantile")


# -- targets the reference cannot resolve ---------------------------------------------------


def test_unresolvable_target_names_the_reference_size_needed():
    ref = _draws(1, N_REF, seed=11)[0]
    with pytest.raises(ConfigError, match=r"Expected at least 4999 normal reference scores to "
                                          r"resolve fpr@0\.1%.*Received: 592"):
        calibrate(ref, target_fprs=(0.001,))
    assert required_reference(0.001) == 4999 and required_reference(0.01) == 499
    calibrate(np.arange(499.0), target_fprs=(0.01,))  # (499 + 1) * 1% = 5: just enough
    with pytest.raises(ConfigError, match="at least 499"):
        calibrate(np.arange(498.0), target_fprs=(0.01,))


def test_forced_unresolvable_target_uses_the_maximum_or_extrapolates(caplog):
    caplog.set_level("INFO", logger="anomaly")
    ref = np.sort(_draws(1, 50, seed=12)[0])
    op = calibrate(ref, target_fprs=(0.01,), force=True).get()
    assert op.threshold == ref[-1] and op.reference_flagged == 0
    assert op.expected_fpr == 1 / 51  # what 50 images can promise, not the 1% asked for
    assert "cannot resolve a 1.00% FPR (499 needed)" in caplog.text
    smooth = calibrate(ref, target_fprs=(0.01, 0.0001), rule="smooth", force=True)
    assert smooth.get("fpr@1%").expected_fpr == pytest.approx(0.01)
    far = smooth.get("fpr@0.01%")  # 1 in 10,000 from 50 images: only the tail model can say
    assert far.threshold > ref[-1] and far.expected_fpr == pytest.approx(0.0001)


# -- operating points -----------------------------------------------------------------------


def test_several_fpr_points_and_default():
    scores = np.random.default_rng(0).normal(size=5000)
    cal = calibrate(scores, target_fprs=(0.01, 0.05, 0.1), default="fpr@5%")
    assert list(cal.operating_points) == ["fpr@1%", "fpr@5%", "fpr@10%"]
    assert cal.default == "fpr@5%" and cal.get().name == "fpr@5%"
    thresholds = [cal.operating_points[n].threshold for n in ("fpr@1%", "fpr@5%", "fpr@10%")]
    assert thresholds[0] > thresholds[1] > thresholds[2]  # a lower FPR needs a higher threshold


def test_threshold_is_the_conformal_order_statistic_and_strictly_greater():
    normal = np.arange(1.0, 101.0)  # 1..100
    op = calibrate(normal, target_fprs=(0.05,)).get()
    # k = ceil(101 * 0.95) = 96: the 96th smallest score; 4 of 100 lie above it.
    assert op.threshold == 96.0 and op.reference_flagged == 4
    assert op.expected_fpr == 5 / 101 and op.fpr_interval == clopper_pearson(4, 100)
    flagged = calibrate(normal, target_fprs=(0.05,)).decide(np.array([96.0, 96.0 + 1e-9, 95.0]))
    assert flagged.tolist() == [False, True, False]


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
    normal = np.round(rng.normal(0.0, 1.0, 600), 2).astype(np.float32).astype(np.float64)
    anomalies = np.round(rng.normal(1.5, 1.0, 60), 2).astype(np.float32).astype(np.float64)
    cal = calibrate(normal, anomalies)
    assert list(cal.operating_points) == ["fpr@1%", "f1-max", "youden"]
    assert cal.default == "fpr@1%"
    for name, metric in (("f1-max", _f1), ("youden", _youden)):
        best, y, s = _brute_force(normal, anomalies, metric)
        op = cal.get(name)
        got = metric(y, s > op.threshold)  # the project's rule: anomalous iff score > threshold
        assert got == pytest.approx(best, abs=1e-12), name
        assert op.reference_flagged == np.sum(normal > op.threshold)
        assert op.expected_fpr == cal.p_value(np.array([op.threshold]))[0]
        assert op.expected_tpr == pytest.approx(np.mean(anomalies > op.threshold))


def test_f1_max_separable_data_flags_exactly_the_anomalies():
    normal = np.linspace(0.0, 1.0, 600)
    anomalies = np.linspace(2.0, 3.0, 10)
    cal = calibrate(normal, anomalies)
    for name in ("f1-max", "youden"):
        op = cal.get(name)
        assert op.reference_flagged == 0 and op.expected_tpr == 1.0, name
        assert 1.0 <= op.threshold < 2.0


# -- normalized scores ----------------------------------------------------------------------


def test_normalized_score_is_the_ecdf():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=1000)
    cal = calibrate(ref)
    queries = np.r_[rng.normal(size=500), ref[:20], -10.0, 10.0]
    expected = np.array([np.mean(ref <= q) for q in queries])  # fraction at or below
    np.testing.assert_allclose(cal.normalize(queries), expected, rtol=0, atol=1e-12)


def test_tail_p_value_is_monotone_continuous_and_never_saturates():
    ref = np.sort(_draws(1, 2000, seed=13)[0])
    cal = calibrate(ref)
    grid = np.linspace(ref[0], 50 * ref[-1], 20_000)
    p = cal.p_value(grid)
    assert np.all(np.diff(p) < 0)  # strictly decreasing from the minimum on
    assert np.all(p > 0)
    assert np.all(cal.p_value(np.array([ref[-1], ref[-1] + 1, ref[-1] + 2])) > 0)
    assert np.all(np.diff(cal.normalize(grid[grid > ref[-1]])) == 0)  # the ECDF saturates
    huge = np.array([1e3, 1e5, 1e7]) * ref[-1]  # p underflows; the surprise keeps ranking
    s = cal.surprise(huge)
    assert np.all(np.isfinite(s)) and np.all(np.diff(s) > 0)
    u = cal.tail.junction  # no jump where the tail model takes over
    eps = 1e-9 * max(1.0, abs(u))
    left, right = cal.p_value(np.array([u - eps, u + eps]))
    assert right == pytest.approx(left, rel=1e-6)
    assert cal.p_value(np.array([ref[0] - 100.0]))[0] == 1.0
    np.testing.assert_allclose(cal.surprise(grid[:50]), -np.log10(p[:50]), rtol=1e-12)


@pytest.mark.parametrize("dist, heavy", [(DIST, False), (stats.norm(), False),
                                         (stats.lognorm(1.0), True), (stats.pareto(3.0), True)])
def test_tail_p_value_tracks_the_true_tail(dist, heavy):
    ref = dist.rvs(size=5000, random_state=np.random.default_rng(14))
    cal = calibrate(ref)
    assert cal.tail.method == "genpareto" and cal.tail.n_exceedances == 500
    assert (cal.tail.shape > 0.1) == heavy, cal.tail.shape
    # One reference set: 50 scores lie above 1e-2, 5 above 1e-3 and none above 1e-4, so even
    # a perfect estimate from them varies by about +-30%, 0.3-2x and more. The bounds follow;
    # test_p_values_of_new_normal_images_are_calibrated_on_average averages over sets.
    for true_p, factor in ((1e-2, 1.5), (1e-3, 3.0), (1e-4, 10.0)):
        est = cal.p_value(np.array([dist.isf(true_p)]))[0]
        assert true_p / factor < est < true_p * factor, (true_p, est)


def test_bounded_tail_keeps_ranking_beyond_its_end():
    ref = np.random.default_rng(15).uniform(0.0, 1.0, 1000)  # a bounded tail: shape < 0
    cal = calibrate(ref)
    tail = cal.tail
    assert tail.method == "genpareto" and tail.shape < 0
    end = tail.threshold + tail.scale / -tail.shape  # where the fitted distribution ends
    p = cal.p_value(np.array([1.0, end, end + 0.1, 3.0, 10.0]))
    assert np.all(p > 0) and np.all(np.diff(p) < 0)
    assert np.all(np.diff(cal.surprise(np.array([10.0, 1e3, 1e6]))) > 0)
    assert cal.threshold_for(1e-6) > end  # the inverse follows the continuation


def test_p_values_of_new_normal_images_are_calibrated_on_average():
    # P(p(X) <= level) for a new normal X is the true FPR of the score where p = level.
    rates = np.array([[DIST.sf(calibrate(ref).threshold_for(level)) / level
                       for level in (0.1, 0.01, 0.001)] for ref in _draws(200, 3000, seed=16)])
    mean, se = rates.mean(axis=0), rates.std(axis=0) / math.sqrt(len(rates))
    # Where 30 or more reference scores lie above, the p-value is the conformal one: exact.
    assert np.all(np.abs(mean[:2] - 1) < 4 * se[:2]), mean
    # At 3 scores above, the tail model's bias shows (gamma: 1.13x), but stays modest.
    assert 0.8 < mean[2] < 1.3, mean


# -- persistence ----------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip_through_json():
    rng = np.random.default_rng(4)
    cal = calibrate(rng.gamma(2.0, size=1000), rng.gamma(6.0, size=40),
                    target_fprs=(0.01, 0.1), default="youden", rule="smooth")
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.default == "youden"
    assert back.operating_points == cal.operating_points
    assert back.tail == cal.tail and back.settings == cal.settings
    assert back.fingerprint() == cal.fingerprint()
    np.testing.assert_array_equal(back.reference_scores, cal.reference_scores)
    q = rng.gamma(3.0, size=100) * 3
    np.testing.assert_array_equal(back.normalize(q), cal.normalize(q))
    np.testing.assert_array_equal(back.p_value(q), cal.p_value(q))
    for name in cal.operating_points:
        np.testing.assert_array_equal(back.decide(q, name), cal.decide(q, name))


def test_from_dict_reads_a_format_1_calibration():
    ref = list(np.round(np.linspace(0.0, 1.0, 200) ** 2, 6))
    old = {"default": "fpr@1%", "reference_scores": ref, "operating_points": {
        "fpr@1%": {"name": "fpr@1%", "threshold": ref[197], "method": "normal-quantile",
                   "expected_fpr": 0.01, "expected_tpr": None, "target_fpr": 0.01}}}
    cal = Calibration.from_dict(json.loads(json.dumps(old)))
    op = cal.get()
    assert (op.threshold, op.method, op.expected_fpr) == (ref[197], "normal-quantile", 0.01)
    assert op.n_reference == 200 and op.reference_flagged == 2
    assert op.fpr_interval == clopper_pearson(2, 200)
    assert cal.decide(np.array([ref[197], ref[198]])).tolist() == [False, True]
    assert cal.p_value(np.array([2.0]))[0] > 0
    assert Calibration.from_dict(cal.to_dict()).fingerprint() == cal.fingerprint()


def test_hand_made_calibration_round_trips():
    op = OperatingPoint("manual", 2.5, "manual", 0.02)
    cal = Calibration({"manual": op}, "manual", np.arange(100.0))
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.fingerprint() == cal.fingerprint() and back.get() == op


def test_from_dict_rejects_missing_default_or_references():
    data = calibrate(np.arange(1000.0)).to_dict()
    with pytest.raises(ValueError):
        Calibration.from_dict({**data, "default": "nope"})
    with pytest.raises(ValueError):
        Calibration.from_dict({**data, "reference_scores": []})


# -- recalibration --------------------------------------------------------------------------


def test_recalibrate_changes_thresholds_only_when_the_data_change():
    rng = np.random.default_rng(17)
    ref, anomalies = rng.gamma(2.0, size=1000), rng.gamma(6.0, size=50)
    cal = calibrate(ref, anomalies, target_fprs=(0.01, 0.05), rule="smooth")
    same, lineage = recalibrate(cal, rng.permutation(ref), anomalies)
    assert same.fingerprint() == cal.fingerprint()
    assert lineage["sha256"] == lineage["parent_sha256"] == cal.fingerprint()
    assert all(t["before"] == t["after"] for t in lineage["thresholds"].values())
    assert lineage["added"] == lineage["dropped"] == []
    new_ref = rng.gamma(2.0, size=1000)
    new, lineage = recalibrate(cal, new_ref)
    assert new.settings["rule"] == "smooth"  # the calibration's own rule is kept
    assert lineage["sha256"] != lineage["parent_sha256"]
    assert lineage["dropped"] == ["f1-max", "youden"]  # no anomalies this time
    for name in ("fpr@1%", "fpr@5%"):
        t = lineage["thresholds"][name]
        assert t["before"] == cal.get(name).threshold and t["after"] == new.get(name).threshold
        assert t["before"] != t["after"]
    assert lineage["n_reference"] == {"before": 1000, "after": 1000}
    json.dumps(lineage)  # the lead stores it in the manifest


def test_recalibrate_can_pool_targets_and_settings():
    rng = np.random.default_rng(18)
    cal = calibrate(rng.gamma(2.0, size=1000), target_fprs=(0.05,))
    new, lineage = recalibrate(cal, rng.gamma(2.0, size=1000), target_fprs=(0.01, 0.05),
                               keep_reference=True, rule="pac")
    assert new.n_reference == 2000 and set(new.sources) == {"new", "previous"}
    assert lineage["added"] == ["fpr@1%"] and new.default == "fpr@5%"
    assert new.get().method == "conformal-pac"
    with pytest.raises(ConfigError, match="settings among"):
        recalibrate(cal, rng.gamma(2.0, size=1000), rulle="pac")


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.array([1.0]), np.array([1.0, np.nan, 2.0]),
                                 np.array([1.0, np.inf]), np.ones((3, 2)), "abc"])
def test_calibrate_rejects_bad_normal_scores(bad):
    with pytest.raises(ConfigError, match="Expected at least 2 finite normal validation"):
        calibrate(bad, force=True)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, "1%"])
def test_calibrate_rejects_bad_target_fpr(fpr):
    with pytest.raises(ConfigError, match=r"target FPRs in \(0, 1\)"):
        calibrate(np.arange(1000.0), target_fprs=(fpr,))


def test_calibrate_rejects_unknown_default_and_bad_anomaly_scores():
    with pytest.raises(ConfigError, match="default operating point"):
        calibrate(np.arange(1000.0), default="f1-max")  # no anomalies, so no f1-max point
    with pytest.raises(ConfigError, match="finite calibration anomaly scores"):
        calibrate(np.arange(1000.0), np.array([1.0, np.nan]))


def test_unknown_operating_point_is_not_found():
    cal = calibrate(np.arange(1000.0))
    with pytest.raises(NotFoundError, match=r"operating point in \['fpr@1%'\]"):
        cal.get("fpr@2%")


def test_fpr_names_round_trip():
    assert fpr_name(0.01) == "fpr@1%"
    assert fpr_name(0.005) == "fpr@0.5%"
    assert parse_fpr_name("fpr@5%") == pytest.approx(0.05)
    assert parse_fpr_name(fpr_name(0.005)) == pytest.approx(0.005)
    with pytest.raises(ConfigError):
        parse_fpr_name("f1-max")


@pytest.mark.parametrize("ref", [np.ones(600), np.r_[np.linspace(0.0, 1.0, 500), np.ones(100)]])
def test_tied_references_still_rank_above_the_tie(ref):
    cal = calibrate(ref, rule="smooth")
    op = cal.get()
    assert op.threshold >= 1.0 and op.reference_flagged == 0
    above = np.array([1.0, 1.0 + 1e-3, 2.0, 100.0])
    assert np.all(np.diff(cal.p_value(above)) <= 0) and np.all(np.diff(cal.surprise(above)) > 0)
    assert np.all(np.isfinite(cal.surprise(above)))
    assert cal.decide(np.array([1.0, 2.0])).tolist() == [False, True]


def test_bad_settings_are_config_errors():
    ref = np.arange(1000.0)
    for kwargs, match in (({"confidence": 1.0}, "confidence in"),
                          ({"tail_fraction": 0.0}, "tail fraction in"),
                          ({"min_exceedances": 0}, "min_exceedances as an integer")):
        with pytest.raises(ConfigError, match=match):
            calibrate(ref, **kwargs)
    with pytest.raises(ConfigError, match="at least 2 finite held-out normal scores"):
        estimate_optimism(ref, [1.0])
