"""Every Prometheus metric of the service, defined here and nowhere else, as one
:class:`ServiceMetrics` object per app (``app.state.metrics``, reached through the
``MetricsDep`` dependency): no module-level metric, so two apps in one process (tests) never
share or erase each other's series.

Conventions: prefix ``anomaly_``, base units (seconds), counters end in ``_total``, latency and
size distributions are histograms (aggregatable across replicas, unlike summaries). Label values
come from fixed sets only: route templates (``/v1/models/{name}/score``, never the raw path),
model names and versions the registry has loaded, operating point names from the artifacts,
status codes and the rejection reasons of :data:`service.errors.INPUT_ERROR_CODES`. A request
naming an unknown model is counted under ``model="_other"``.

Processes: the service runs **one worker per process** and scales by replicas, so this module
uses plain in-process metrics (no ``PROMETHEUS_MULTIPROC_DIR``). Each replica is one scrape
target; aggregate across replicas in PromQL (``sum by (model) (rate(...))``).

ML monitoring (for the alert rules and dashboard of the monitoring issue):

- ``anomaly_score`` is a histogram per model and version whose buckets are placed from that
  version's calibration: quantiles of its normal reference scores, every operating point's
  threshold (so "flagged" = ``_count`` minus the ``le=threshold`` bucket), and points above the
  reference maximum where anomalies land.
- ``anomaly_score_drift_ks`` / ``anomaly_score_drift_psi`` compare the last
  ``ANOMALY_DRIFT_WINDOW`` live scores with the calibration reference scores (two-sample
  Kolmogorov-Smirnov statistic in [0, 1]; population stability index over the reference
  deciles, where > 0.2 is the usual "shifted" rule). ``anomaly_score_drift_window_images`` says
  how many live scores the statistics are based on; the statistics appear once it is > 0.
- ``anomaly_expected_anomaly_ratio`` is the operating point's ``expected_fpr`` (the fraction of
  normal validation images it flags), to compare with
  ``rate(anomaly_flagged_images_total[..]) / rate(anomaly_images_scored_total[..])``.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Sample

# The *_created series double the exposition for little use (Prometheus ignores them).
disable_created_metrics()

#: Latency buckets in seconds: fine below 20 ms, where the single-image target lies.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OTHER_MODEL = "_other"


def score_buckets(reference: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Histogram upper bounds for one model's scores, placed from its calibration.

    Args:
        reference: the normal reference scores (calibration), any order.
        thresholds: every operating point's threshold, kept exactly.

    Returns:
        Strictly increasing finite bounds (``+Inf`` is added on export).
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    qs = np.quantile(ref, [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    low, top, median = float(ref[0]), float(ref[-1]), float(np.median(ref))
    spread = max(top - median, abs(top) * 1e-3, 1e-12)
    above = [top + spread * k for k in (0.5, 1, 2, 4, 8, 16, 32)]
    # A few below the lowest normal score too: unusually *easy* images are a shift as well.
    below = [low - max(median - low, 1e-12) * k for k in (1, 0.5)]
    rounded = [float(f"{v:.4g}") for v in [*below, low, *qs, top, *above]]
    bounds = np.unique(np.array([*rounded, *map(float, thresholds)], dtype=np.float64))
    return bounds[np.isfinite(bounds)]


class _ScoreSeries:
    """Histogram counts and the drift window of one model version."""

    def __init__(self, reference: np.ndarray, thresholds: list[float], window: int):
        self.reference = np.sort(np.asarray(reference, dtype=np.float64))
        self.bounds = score_buckets(self.reference, thresholds)
        self.bounds_list = self.bounds.tolist()
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self.sum = 0.0
        self.window = np.empty(window, dtype=np.float64)
        self.filled = 0
        self.pos = 0
        # PSI bins: the reference deciles, so each bin holds ~10% of the normal scores.
        self.psi_edges = np.unique(np.quantile(self.reference, np.linspace(0.1, 0.9, 9)))
        self.psi_expected = self._fractions(self.reference)

    def _fractions(self, values: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.psi_edges, values, side="right")
        return np.bincount(idx, minlength=len(self.psi_edges) + 1) / max(len(values), 1)

    def observe(self, scores: np.ndarray) -> None:
        # le buckets count score <= bound, matching "anomalous when score > threshold".
        if len(scores) <= 4:  # single images: scalar steps cost a tenth of the array passes
            top = len(self.bounds_list)
            for v in scores.tolist():
                # NaN compares false everywhere: +Inf's bucket, as searchsorted puts it.
                self.counts[bisect.bisect_left(self.bounds_list, v) if v == v else top] += 1
                self.sum += v
        else:
            self.counts += np.bincount(np.searchsorted(self.bounds, scores, side="left"),
                                       minlength=len(self.counts))
            self.sum += float(np.sum(scores))
        n = len(self.window)
        tail = scores[-n:]
        k = len(tail)
        end = self.pos + k
        if end <= n:
            self.window[self.pos:end] = tail
        else:
            split = n - self.pos
            self.window[self.pos:] = tail[:split]
            self.window[: k - split] = tail[split:]
        self.pos = end % n
        self.filled = min(n, self.filled + k)

    def drift(self) -> tuple[float, float]:
        from scipy.stats import ks_2samp

        live = self.window[: self.filled]
        ks = float(ks_2samp(live, self.reference).statistic)
        eps = 1e-4
        actual = np.clip(self._fractions(live), eps, None)
        expected = np.clip(self.psi_expected, eps, None)
        psi = float(np.sum((actual - expected) * np.log(actual / expected)))
        return ks, psi


class ScoreMonitor:
    """Custom collector: per-model score histograms with calibrated buckets, and drift.

    prometheus_client's ``Histogram`` shares one bucket layout across all label values, and
    each model needs its own, so this collector keeps the counts itself.
    """

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _ScoreSeries] = {}
        self.window = window

    def add(self, model: str, version: str, reference: np.ndarray,
            thresholds: list[float]) -> None:
        """Start (or restart) the series of a model version (reference scores ``(M,)``)."""
        with self._lock:
            self._series[(model, version)] = _ScoreSeries(reference, thresholds, self.window)

    def has(self, model: str, version: str) -> bool:
        with self._lock:
            return (model, version) in self._series

    def remove(self, model: str, version: str) -> None:
        with self._lock:
            self._series.pop((model, version), None)

    def observe(self, model: str, version: str, scores: np.ndarray) -> None:
        with self._lock:
            series = self._series.get((model, version))
            if series is not None and len(scores):
                series.observe(np.asarray(scores, dtype=np.float64))

    def describe(self):
        return [HistogramMetricFamily("anomaly_score", "", labels=["model", "version"]),
                GaugeMetricFamily("anomaly_score_drift_ks", "", labels=["model", "version"]),
                GaugeMetricFamily("anomaly_score_drift_psi", "", labels=["model", "version"]),
                GaugeMetricFamily("anomaly_score_drift_window_images", "",
                                  labels=["model", "version"])]

    def collect(self):
        hist = HistogramMetricFamily(
            "anomaly_score", "Anomaly scores (higher = more anomalous) by model and version; "
            "buckets placed at the version's calibration quantiles and thresholds.",
            labels=["model", "version"])
        ks = GaugeMetricFamily(
            "anomaly_score_drift_ks", "Kolmogorov-Smirnov statistic between the last "
            "ANOMALY_DRIFT_WINDOW live scores and the calibration reference scores (0 = same "
            "distribution, 1 = disjoint).", labels=["model", "version"])
        psi = GaugeMetricFamily(
            "anomaly_score_drift_psi", "Population stability index of the live score window "
            "over the calibration reference deciles (> 0.2: shifted).",
            labels=["model", "version"])
        size = GaugeMetricFamily(
            "anomaly_score_drift_window_images", "Live scores in the drift window.",
            labels=["model", "version"])
        with self._lock:
            for (model, version), s in sorted(self._series.items()):
                cumulative = np.cumsum(s.counts)
                buckets = [(_le(b), float(c)) for b, c in zip(s.bounds, cumulative[:-1],
                                                             strict=True)]
                buckets.append(("+Inf", float(cumulative[-1])))
                hist.add_metric([model, version], buckets, s.sum)
                if s.bounds.size and s.bounds[0] < 0:
                    # prometheus_client drops _count (and _sum, which OpenMetrics forbids then)
                    # when a bucket is negative, as mse+knn scores are: keep the count, which
                    # the dashboard and the flagged-ratio rules divide by.
                    hist.samples.append(Sample("anomaly_score_count",
                                               {"model": model, "version": version},
                                               float(cumulative[-1])))
                size.add_metric([model, version], float(s.filled))
                if s.filled:
                    d_ks, d_psi = s.drift()
                    ks.add_metric([model, version], d_ks)
                    psi.add_metric([model, version], d_psi)
        yield from (hist, ks, psi, size)


def _le(bound: float) -> str:
    return repr(float(bound))


class ServiceMetrics:
    """The metrics of one app, on their own ``CollectorRegistry`` (with process CPU/memory).

    The service's own registry (not prometheus_client's global one), so importing other
    libraries that register metrics cannot change what /metrics exports.
    """

    def __init__(self, drift_window: int = 1000) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # -- HTTP (RED) ------------------------------------------------------------------------
        self.requests = Counter(
            "anomaly_requests", "HTTP requests by route template, method, model, status code "
            "and outcome (success, client_error, server_error; not_ready for a readiness "
            "probe's 'not ready' answer).",
            ["route", "method", "model", "code", "outcome"], registry=r)
        self.request_duration = Histogram(
            "anomaly_request_duration_seconds", "HTTP request latency from the first byte "
            "received by the app to the response, by route template, method and model.",
            ["route", "method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("anomaly_requests_in_flight", "HTTP requests being handled now.",
                               registry=r)
        self.input_rejections = Counter(
            "anomaly_input_rejections", "Requests rejected for their content (4xx), by model and "
            "reason (the error code: invalid_shape, non_finite, out_of_range, invalid_base64, "
            "invalid_image, empty_batch, batch_too_large, payload_too_large, invalid_json, "
            "json_too_complex, too_many_pixels, unsupported_media_type, ...).",
            ["model", "reason"], registry=r)
        # -- Model execution -------------------------------------------------------------------
        self.stage_duration = Histogram(
            "anomaly_stage_duration_seconds", "Time per scoring request in each stage: decode "
            "(body to validated pixels), queue (waiting for the model), predict (the model call "
            "the request's images ran in), encode (building the response).",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_batch_size = Histogram(
            "anomaly_request_batch_size", "Images per scoring request.", ["model"],
            buckets=BATCH_BUCKETS, registry=r)
        self.inference_batch_size = Histogram(
            "anomaly_inference_batch_size", "Images per model call, after micro-batching "
            "concurrent requests.", ["model"], buckets=BATCH_BUCKETS, registry=r)
        # -- ML --------------------------------------------------------------------------------
        self.images_scored = Counter(
            "anomaly_images_scored", "Images scored, by model, version and operating point.",
            ["model", "version", "operating_point"], registry=r)
        self.flagged_images = Counter(
            "anomaly_flagged_images", "Images flagged anomalous (score > threshold), by model, "
            "version and operating point.", ["model", "version", "operating_point"], registry=r)
        self.expected_anomaly_ratio = Gauge(
            "anomaly_expected_anomaly_ratio", "Fraction of normal validation images the "
            "operating point flags (its expected false-positive rate): the anomaly ratio to "
            "expect on normal traffic.", ["model", "version", "operating_point"], registry=r)
        self.feedback_records = Counter(
            "anomaly_feedback_records", "Label feedback records stored, by model and label "
            "(normal, anomaly).", ["model", "label"], registry=r)
        self.scores = ScoreMonitor(drift_window)
        r.register(self.scores)
        # -- Registry --------------------------------------------------------------------------
        self.model_info = Gauge(
            "anomaly_model_info", "1 for each loaded model version; default='true' marks the "
            "version served when none is named.",
            ["model", "version", "sha256", "model_type", "dataset", "default"], registry=r)
        self.model_ready = Gauge("anomaly_model_ready", "1 when the model has a loaded, "
                                 "warmed-up version.", ["model"], registry=r)
        self.model_refused_versions = Gauge(
            "anomaly_model_refused_versions", "Versions in the models directory refused at the "
            "last reload (failed verification, loading or warm-up); the previous ones keep "
            "serving.", ["model"], registry=r)
        self.model_load_failures = Counter(
            "anomaly_model_load_failures", "Version loads refused (failed verification, "
            "loading or warm-up).", ["model"], registry=r)
        self.model_reloads = Counter(
            "anomaly_model_reloads", "Registry reloads by outcome: success, partial (some "
            "versions refused), error (the directory could not be read; nothing changed).",
            ["outcome"], registry=r)
        self.model_last_reload = Gauge("anomaly_model_last_reload_timestamp_seconds",
                                       "Unix time of the last registry reload.", registry=r)
        self.ready = Gauge("anomaly_ready", "1 when every model in the directory is loaded and "
                           "warmed up (what /readyz reports).", registry=r)
        self.build_info = Gauge("anomaly_build_info", "1, with the service and library "
                                "versions as labels.", ["version", "tensorflow", "keras"],
                                registry=r)
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, looked up once: prometheus_client's ``labels`` costs a
        few microseconds a call (validation, a lock, a tuple of str()s), and a scoring request
        makes nine of them. Label values are bounded (see the middleware), so is this."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_build_info(self) -> None:
        """Export ``anomaly_build_info`` (called once the libraries are imported)."""
        from importlib import metadata

        def version(dist: str) -> str:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return "unknown"

        self.build_info.clear()
        self.build_info.labels(version=version("anomaly"), tensorflow=version("tensorflow"),
                               keras=version("keras")).set(1)

    def observe_scores(self, model: str, version: str, operating_point: str,
                       scores: np.ndarray, flagged: int) -> None:
        """Count one request's scored images ``(n,)`` and decisions; feed histogram and drift."""
        self.child(self.images_scored, model, version, operating_point).inc(len(scores))
        self.child(self.flagged_images, model, version, operating_point).inc(flagged)
        self.scores.observe(model, version, scores)

    def forget_version(self, model: str, version: str) -> None:
        """Drop the series of a version this app no longer serves."""
        self.scores.remove(model, version)
        labels = {"model": model, "version": version}
        for metric in (self.images_scored, self.flagged_images):
            metric.remove_by_labels(labels)
            stale = [k for k in self._children if k[0] == id(metric) and k[1:3] == (model,
                                                                                    version)]
            for k in stale:
                del self._children[k]

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
