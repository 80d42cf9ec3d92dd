"""Publishing the registry's state as gauges: model info, readiness, refused versions, the
expected anomaly ratio of each operating point, and the score series of each served version."""

from __future__ import annotations

import contextlib

from service.metrics import ServiceMetrics


class GaugePublisher:
    """Brings one app's registry gauges in line with a snapshot (on the event loop, so a scrape
    never sees a reload half-published)."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics
        self._series: list[tuple] = []  # (gauge, labels) set by the last publish

    def publish(self, snap, retired, *, ready: bool) -> None:
        """``snap``: the registry's new :class:`~service.registry.Snapshot`; ``retired``: the
        loaded versions it no longer serves (their series are dropped)."""
        m = self.metrics
        for model in retired:
            m.forget_version(model.name, model.version)
        for gauge, labels in self._series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        series: list[tuple] = []

        def put(gauge, labels: tuple, value: float) -> None:
            gauge.labels(*labels).set(value)
            series.append((gauge, labels))

        for name, entry in snap.models.items():
            put(m.model_ready, (name,), 1 if entry.ready else 0)
            for label in ("normal", "anomaly"):  # counters start at 0, so rate() sees the first
                m.feedback_records.labels(name, label)
            put(m.model_refused_versions, (name,), len(entry.refused))
            for version, model in entry.versions.items():
                meta = model.metadata
                put(m.model_info, (name, version, model.sha256, str(meta.get("model_type", "")),
                                   str(meta.get("dataset", "")),
                                   "true" if version == entry.default else "false"), 1)
                ops = model.calibration.operating_points.values()
                for op in ops:
                    put(m.expected_anomaly_ratio, (name, version, op.name), op.expected_fpr)
                if not m.scores.has(name, version):
                    m.scores.add(name, version, model.calibration.reference_scores,
                                 [p.threshold for p in ops])
        self._series = series
        m.ready.set(1 if ready else 0)
