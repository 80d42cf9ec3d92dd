"""/metrics parsed with prometheus_client's parser: names, types, labels, and that they move."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import bars, blobs


def scrape(client) -> dict[str, list]:
    """Metric family name -> its samples, from the service's /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families, name: str, sample: str | None = None, **labels) -> float:
    """Sum of the samples of a family matching ``labels`` (0 when none)."""
    fam = families.get(name)
    if fam is None:
        return 0.0
    sample = sample or name
    return sum(s.value for s in fam.samples if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def mclient(models_root):
    from tests.service.conftest import running_app

    with running_app(models_root, drift_window=50) as c:
        yield c


def test_metric_names_types_and_units(mclient):
    fams = scrape(mclient)
    ours = {n: f.type for n, f in fams.items() if n.startswith("anomaly_")}
    expected = {
        "anomaly_requests": "counter", "anomaly_request_duration_seconds": "histogram",
        "anomaly_requests_in_flight": "gauge", "anomaly_input_rejections": "counter",
        "anomaly_stage_duration_seconds": "histogram",
        "anomaly_request_batch_size": "histogram", "anomaly_inference_batch_size": "histogram",
        "anomaly_images_scored": "counter", "anomaly_flagged_images": "counter",
        "anomaly_expected_anomaly_ratio": "gauge", "anomaly_model_info": "gauge",
        "anomaly_model_ready": "gauge", "anomaly_model_refused_versions": "gauge",
        "anomaly_model_load_failures": "counter", "anomaly_model_reloads": "counter",
        "anomaly_model_last_reload_timestamp_seconds": "gauge", "anomaly_ready": "gauge",
        "anomaly_build_info": "gauge", "anomaly_score": "histogram",
        "anomaly_score_drift_ks": "gauge", "anomaly_score_drift_psi": "gauge",
        "anomaly_score_drift_window_images": "gauge", "anomaly_feedback_records": "counter",
    }
    for name, typ in expected.items():
        if name in ours:
            assert ours[name] == typ, name
    assert {n for n in ours if n in expected} >= {
        "anomaly_requests_in_flight", "anomaly_expected_anomaly_ratio", "anomaly_model_info",
        "anomaly_model_ready", "anomaly_ready", "anomaly_build_info", "anomaly_score",
        "anomaly_score_drift_window_images", "anomaly_feedback_records"}
    assert set(ours) <= set(expected), set(ours) - set(expected)
    text = mclient.get("/metrics").text
    assert "_created" not in text and "summary" not in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    info = [s for s in fams["anomaly_model_info"].samples if s.labels["default"] == "true"]
    assert [s.labels["version"] for s in info] == ["v2"]
    assert value(fams, "anomaly_ready") == 1
    assert value(fams, "anomaly_model_ready", model="blobs") == 1
    # Before any traffic: an empty drift window and no drift statistics yet.
    assert value(fams, "anomaly_score_drift_window_images", version="v2") == 0
    assert not fams.get("anomaly_score_drift_ks") or not fams["anomaly_score_drift_ks"].samples


def test_metrics_move_with_requests(mclient, detector):
    before = scrape(mclient)
    x = np.concatenate([blobs(10, seed=21), bars(3, seed=22)])
    r = mclient.post("/v1/models/blobs/score", json={"images": x.tolist()})
    assert r.status_code == 200
    flagged = sum(i["is_anomaly"] for i in r.json()["results"])
    assert flagged >= 3
    mclient.post("/v1/models/blobs/score", json={"images": [[[-1] * 28] * 28]})
    mclient.post("/v1/models/blobs/score", json={"images": []})
    mclient.post("/v1/models/no-such-model/score", json={"images": []})
    after = scrape(mclient)

    def delta(name, sample=None, **labels):
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    route = "/v1/models/{name}/score"
    assert delta("anomaly_requests", "anomaly_requests_total", route=route, model="blobs",
                 code="200", outcome="success") == 1
    assert delta("anomaly_requests", "anomaly_requests_total", route=route, model="blobs",
                 code="422", outcome="client_error") == 2
    assert delta("anomaly_requests", "anomaly_requests_total", route=route, model="_other",
                 code="404") == 1
    assert delta("anomaly_request_duration_seconds", "anomaly_request_duration_seconds_count",
                 route=route, model="blobs") == 3
    labels = {"model": "blobs", "version": "v2", "operating_point": "fpr@1%"}
    assert delta("anomaly_images_scored", "anomaly_images_scored_total", **labels) == 13
    assert delta("anomaly_flagged_images", "anomaly_flagged_images_total", **labels) == flagged
    assert delta("anomaly_score", "anomaly_score_count", model="blobs", version="v2") == 13
    for reason in ("out_of_range", "empty_batch"):
        assert delta("anomaly_input_rejections", "anomaly_input_rejections_total",
                     model="blobs", reason=reason) == 1
    for stage in ("decode", "queue", "predict", "encode"):
        assert delta("anomaly_stage_duration_seconds", "anomaly_stage_duration_seconds_count",
                     model="blobs", stage=stage) == 1
    assert delta("anomaly_request_batch_size", "anomaly_request_batch_size_sum",
                 model="blobs") == 13
    assert delta("anomaly_inference_batch_size", "anomaly_inference_batch_size_sum",
                 model="blobs") == 13
    assert value(after, "anomaly_requests_in_flight") == 1  # the scrape itself


def test_score_histogram_buckets_follow_the_calibration(mclient, detector):
    fams = scrape(mclient)
    samples = [s for s in fams["anomaly_score"].samples if s.name == "anomaly_score_bucket"
               and s.labels["version"] == "v2"]
    bounds = [float(s.labels["le"]) for s in samples]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    thresholds = [op.threshold for op in detector.calibration_.operating_points.values()]
    for t in thresholds:
        assert t in bounds  # "flagged" = count - bucket(le=threshold), exactly
    ref = detector.calibration_.reference_scores
    assert min(bounds) < np.quantile(ref, 0.05) and max(bounds[:-1]) > ref.max()
    counts = [s.value for s in samples]
    assert counts == sorted(counts)  # cumulative


def test_drift_statistics(mclient):
    mclient.post("/v1/models/blobs/score", json={"images": blobs(50, seed=30).tolist()})
    normal = scrape(mclient)
    assert value(normal, "anomaly_score_drift_window_images", version="v2") == 50
    ks_normal = value(normal, "anomaly_score_drift_ks", version="v2")
    assert ks_normal < 0.5  # normal images, the same distribution as the reference
    mclient.post("/v1/models/blobs/score", json={"images": bars(60, seed=40).tolist()})
    shifted = scrape(mclient)
    assert value(shifted, "anomaly_score_drift_window_images", version="v2") == 50
    assert value(shifted, "anomaly_score_drift_ks", version="v2") > 0.9
    assert value(shifted, "anomaly_score_drift_psi", version="v2") > 1.0
    assert value(shifted, "anomaly_score_drift_psi", version="v2") > value(
        normal, "anomaly_score_drift_psi", version="v2")


def test_drift_ks_and_psi_equal_scipys_on_random_data():
    from scipy.special import rel_entr
    from scipy.stats import ks_2samp

    from service.metrics import _ScoreSeries

    rng = np.random.default_rng(3)
    reference, live = rng.normal(0, 1, 700), rng.normal(0.3, 1.2, 90)
    series = _ScoreSeries(reference, [1.5], window=90)
    series.observe(live)
    ks, psi = series.drift()
    assert ks == pytest.approx(ks_2samp(live, reference).statistic, abs=1e-12)
    edges = np.quantile(np.sort(reference), np.linspace(0.1, 0.9, 9))
    bins = np.r_[-np.inf, edges, np.inf]
    expected = np.histogram(reference, bins)[0] / len(reference)
    actual = np.histogram(live, bins)[0] / len(live)
    # PSI is the symmetrised Kullback-Leibler divergence of the decile fractions.
    want = float(np.sum(rel_entr(actual, expected) + rel_entr(expected, actual)))
    assert psi == pytest.approx(want, rel=1e-9)


def test_single_scores_and_batches_fill_the_same_buckets():
    """One score at a time (the scalar path) and whole batches count alike, bounds included:
    a score equal to a bound is in that bucket (le)."""
    from service.metrics import _ScoreSeries

    rng = np.random.default_rng(4)
    reference = rng.normal(0, 1, 500)
    one, batch = (_ScoreSeries(reference, [1.5], window=64) for _ in range(2))
    live = np.concatenate([rng.normal(0.5, 2, 200), one.bounds[:5], [one.bounds[-1] + 1]])
    for v in live:
        one.observe(np.array([v]))
    batch.observe(live)
    np.testing.assert_array_equal(one.counts, batch.counts)
    assert one.sum == pytest.approx(batch.sum, rel=1e-12)
    # The drift window (a ring: positions differ) holds the same last 64 scores.
    np.testing.assert_array_equal(np.sort(one.window), np.sort(live[-64:]))
    np.testing.assert_array_equal(np.sort(batch.window), np.sort(live[-64:]))
    assert one.filled == batch.filled == 64


def test_no_per_request_label_values(mclient):
    for i in range(5):
        mclient.post(f"/v1/models/random-{i}/score", json={"images": []})
        mclient.get(f"/no/such/path/{i}")
    fams = scrape(mclient)
    models = {s.labels.get("model") for f in fams.values() for s in f.samples}
    routes = {s.labels.get("route") for f in fams.values() for s in f.samples}
    assert not any(str(m).startswith("random-") for m in models)
    assert not any("/no/such" in str(r) for r in routes)
    assert "<unmatched>" in routes


def test_expected_anomaly_ratio_is_the_operating_points_fpr(mclient, detector):
    fams = scrape(mclient)
    for op in detector.calibration_.operating_points.values():
        assert value(fams, "anomaly_expected_anomaly_ratio", model="blobs", version="v2",
                     operating_point=op.name) == pytest.approx(op.expected_fpr)


def test_readiness_503_is_not_a_server_error(app_factory, tmp_path):
    (tmp_path / "empty").mkdir()
    with app_factory(tmp_path / "empty", ready=False) as c:
        for _ in range(3):
            assert c.get("/readyz").status_code == 503
            assert c.get("/v2/health/ready").status_code == 400
        fams = scrape(c)
    for route in ("/readyz", "/v2/health/ready"):
        assert value(fams, "anomaly_requests", "anomaly_requests_total", route=route,
                     outcome="not_ready") == 3
        assert value(fams, "anomaly_requests", "anomaly_requests_total", route=route,
                     outcome="server_error") == 0


def test_two_apps_in_one_process_keep_their_own_metrics(models_root):
    from tests.service.conftest import running_app

    with running_app(models_root) as a, running_app(models_root) as b:
        assert a.post("/v1/models/blobs/score", json={"images": blobs(3).tolist()}
                      ).status_code == 200
        scored = {"model": "blobs", "version": "v2", "operating_point": "fpr@1%"}
        assert value(scrape(a), "anomaly_images_scored", "anomaly_images_scored_total",
                     **scored) == 3
        assert value(scrape(b), "anomaly_images_scored", "anomaly_images_scored_total",
                     **scored) == 0
    assert a.app.state.metrics is not b.app.state.metrics
