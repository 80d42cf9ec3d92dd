"""Threshold calibration: named operating points and a normalized score.

An image is anomalous at an operating point when ``score > threshold``. Operating points:

- ``fpr@P%``: the threshold that flags at most P% of the normal validation images (the
  (1 - P/100) quantile of their scores). Needs only normal data; ``fpr@1%`` is the default.
- ``f1-max``: the threshold that maximises F1 on normal validation images plus labelled
  calibration anomalies (``sklearn.metrics.precision_recall_curve``).
- ``youden``: the threshold that maximises TPR - FPR on the same data (``roc_curve``).

The normalized score is the empirical CDF of the normal validation scores: the fraction of
normal reference images that scored at or below the image, a p-value-like number in [0, 1]
(close to 1 = more extreme than almost all normal images).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from anomaly.errors import ConfigError, NotFoundError, expected

_log = logging.getLogger(__name__)
_FPR_NAME = re.compile(r"^fpr@(\d+(?:\.\d+)?)%$")


@dataclass
class OperatingPoint:
    """A named decision threshold (anomalous when ``score > threshold``)."""

    name: str
    threshold: float
    method: str
    #: Fraction of normal validation images flagged at this threshold (the expected FPR).
    expected_fpr: float
    #: Fraction of calibration anomalies flagged, when there were any.
    expected_tpr: float | None = None
    target_fpr: float | None = None


@dataclass
class Calibration:
    """Operating points plus the normal reference scores behind the normalized score.

    Attributes:
        operating_points: by name, e.g. ``{"fpr@1%": OperatingPoint(...)}``.
        default: the name used when a caller names none.
        reference_scores: sorted scores of the normal validation images, ``(n_ref,)``.
    """

    operating_points: dict[str, OperatingPoint]
    default: str
    reference_scores: np.ndarray = field(repr=False)

    def get(self, name: str | None = None) -> OperatingPoint:
        name = name or self.default
        if name not in self.operating_points:
            raise expected(f"an operating point in {sorted(self.operating_points)}", repr(name),
                           cls=NotFoundError)
        return self.operating_points[name]

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> empirical CDF of the normal reference scores, ``(N,)`` in [0, 1]."""
        ref = self.reference_scores
        return np.searchsorted(ref, np.asarray(scores, dtype=np.float64), side="right") / len(ref)

    def decide(self, scores: np.ndarray, name: str | None = None) -> np.ndarray:
        """``(N,)`` bool: True where the score is above the operating point's threshold."""
        return np.asarray(scores) > self.get(name).threshold

    def to_dict(self) -> dict:
        return {
            "default": self.default,
            "operating_points": {k: asdict(v) for k, v in self.operating_points.items()},
            "reference_scores": [float(s) for s in self.reference_scores],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        ops = {k: OperatingPoint(**v) for k, v in data["operating_points"].items()}
        ref = np.sort(np.asarray(data["reference_scores"], dtype=np.float64))
        if data["default"] not in ops or ref.size == 0:
            raise ValueError("calibration without its default operating point or references")
        return cls(ops, data["default"], ref)


def fpr_name(fpr: float) -> str:
    """0.01 -> ``"fpr@1%"``."""
    return f"fpr@{100 * fpr:g}%"


def parse_fpr_name(name: str) -> float:
    m = _FPR_NAME.match(name)
    if not m:
        raise expected("an operating point like 'fpr@1%'", repr(name), cls=ConfigError)
    return float(m.group(1)) / 100


def _threshold_from_sklearn(t: float) -> float:
    # sklearn's curves flag score >= t; ours flag score > threshold. Float32 scores carried in
    # float64 have no value strictly between nextafter(t, -inf) and t, so both rules agree.
    return float(np.nextafter(np.float64(t), -np.inf))


def calibrate(normal_scores: np.ndarray, anomaly_scores: np.ndarray | None = None, *,
              target_fprs: tuple[float, ...] = (0.01,), default: str | None = None) -> Calibration:
    """Choose thresholds from normal validation scores (and optional labelled anomalies).

    Args:
        normal_scores: ``(n_normal,)`` scores of held-out normal images.
        anomaly_scores: ``(n_anomalies,)`` scores of labelled anomalies, or ``None``.
        target_fprs: false-positive rates for ``fpr@P%`` operating points, each in (0, 1).
        default: default operating point name; the first ``fpr@`` point if ``None``.
    """
    normal = np.asarray(normal_scores, dtype=np.float64)
    if normal.ndim != 1 or normal.size < 2 or not np.isfinite(normal).all():
        raise expected("at least 2 finite normal validation scores", f"shape {normal.shape}",
                       cls=ConfigError)
    if not target_fprs:
        raise expected("at least one target FPR", "none", cls=ConfigError)
    points: dict[str, OperatingPoint] = {}
    for fpr in target_fprs:
        if not 0.0 < fpr < 1.0:
            raise expected("target FPRs in (0, 1), e.g. 0.01", fpr, cls=ConfigError)
        if fpr * normal.size < 1:
            # With fewer than 1/fpr normal images the quantile is the maximum: say so, not guess.
            _log.info("%d normal validation images cannot resolve a %.2f%% FPR; the threshold "
                      "is their maximum score.", normal.size, 100 * fpr)
        thr = float(np.quantile(normal, 1.0 - fpr, method="higher"))
        points[fpr_name(fpr)] = OperatingPoint(
            fpr_name(fpr), thr, "normal-quantile", float(np.mean(normal > thr)), target_fpr=fpr)
    if anomaly_scores is not None and len(anomaly_scores):
        anomalies = np.asarray(anomaly_scores, dtype=np.float64)
        y = np.r_[np.zeros(normal.size), np.ones(anomalies.size)]
        s = np.r_[normal, anomalies]
        precision, recall, thr_pr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        fpr_c, tpr_c, thr_roc = roc_curve(y, s)
        finite = np.isfinite(thr_roc)
        j = np.flatnonzero(finite)[np.argmax((tpr_c - fpr_c)[finite])]
        for name, method, t in (("f1-max", "precision_recall_curve", thr_pr[np.argmax(f1)]),
                                ("youden", "roc_curve", thr_roc[j])):
            thr = _threshold_from_sklearn(t)
            points[name] = OperatingPoint(name, thr, method, float(np.mean(normal > thr)),
                                          float(np.mean(anomalies > thr)))
    default = default or next(iter(points))
    if default not in points:
        raise expected(f"a default operating point in {sorted(points)}", repr(default),
                       cls=ConfigError)
    for p in points.values():
        if not math.isfinite(p.threshold):
            raise ConfigError(f"Calibration produced a non-finite threshold for {p.name}.")
    return Calibration(points, default, np.sort(normal))
