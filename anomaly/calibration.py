"""Threshold calibration: operating points that keep their promise, and normalized scores.

An image is anomalous at an operating point when ``score > threshold``. Operating points:

- ``fpr@P%``: a threshold on the normal reference scores (held-out normal images, possibly
  pooled with other sources, see below) meant to flag P% of new normal images.
- ``f1-max``: the threshold that maximises F1 on the normal reference plus labelled calibration
  anomalies (``sklearn.metrics.precision_recall_curve``).
- ``youden``: the threshold that maximises TPR - FPR on the same data (``roc_curve``).

Threshold rules for ``fpr@P%`` (``calibrate(rule=...)``), with ``n`` reference scores sorted
``x_(1) <= ... <= x_(n)`` and ``alpha = P/100``:

- ``"conformal"`` (default): ``x_(k)`` with ``k = ceil((n + 1)(1 - alpha))``. For exchangeable
  data (new normal images drawn like the reference ones) a new normal score exceeds ``x_(k)``
  with probability exactly ``(n + 1 - k)/(n + 1) <= alpha`` on average over reference sets
  (continuous scores; ties only lower it). The plain ``(1 - alpha)`` sample quantile has no
  such guarantee, and how far it misses depends on how it rounds between order statistics.
- ``"smooth"``: the score where ``p_value`` (below) equals ``alpha``. Where 20 or more
  reference scores lie above it, that is the conformal p-value interpolated between order
  statistics (at ``alpha = j/(n + 1)`` exactly the conformal threshold); further out it is the
  quantile of the fitted generalized Pareto tail, which uses all of the top 10% instead of the
  few order statistics near ``alpha``, and below ``1/(n + 1)`` (only with ``force=True``) it
  extrapolates instead of stopping at the maximum. Where that would flag implausibly many
  reference scores (the target below their count's Clopper-Pearson interval: tied scores just
  above the threshold), it is raised until it does not. It does not round down to the next order
  statistic, so its mean FPR is ``alpha`` up to the tail model's error (seeded simulations,
  300 sets of 592 reference scores from gamma, lognormal, normal and t4 distributions:
  1.03-1.09 x alpha at 1%, 1.00-1.03 x at 5%), rather than ``<= alpha`` (conformal:
  0.84-0.86 x at 1%, because ``floor(593 * 0.01) = 5`` ranks), and it varies less between
  reference sets.
- ``"pac"``: the smallest ``k`` with ``P(FPR(x_(k)) <= alpha) >= confidence`` over reference
  sets. The FPR of ``x_(k)`` is ``Beta(n + 1 - k, k)``-distributed, so ``k`` is a binomial
  quantile. Safer against an unlucky reference set, but on average it flags well below
  ``alpha`` (about half of it for 600 images at 1%).

A target the reference set cannot resolve, ``(n + 1) * alpha < min_exceedances`` (5 by
default: with fewer expected false positives among the reference images, the promised rate's
own 95% range is wider than about a third to twice the target), is a ConfigError that names the
number of reference images needed, unless ``force=True``.

Reference sources and optimism. ``normal_scores`` may be one array or a mapping
``{source: scores}`` (e.g. ``{"holdout": ..., "train": ...}``), pooled after adding each
source's ``optimism``: how much lower that source's scores are than those of fresh normal
images. Scores of images the model was trained or early-stopped on are optimistic; measure the
shift with :func:`estimate_optimism` on images with both kinds of score. The guarantees above
assume the pooled, shifted scores are exchangeable with new normal scores; they are exact for a
clean hold-out and approximate otherwise.

How sure each point is. Every operating point stores ``n_reference``, ``reference_flagged``
(how many reference scores lie above the threshold, ``x``), ``expected_fpr`` (the rate
predicted for new normal images: ``(x + 1)/(n + 1)``, the exact mean, for the
order-statistic rules ``conformal`` and ``pac``; ``p_value(threshold)`` for the others) and
``fpr_interval``, the 95% Clopper-Pearson interval of ``x`` out of ``n``. For a threshold at an
order statistic the true FPR is ``Beta(x + 1, n - x)``, whose upper 2.5% point is the
interval's upper end and whose lower 2.5% point lies above the interval's lower end, so the
interval covers the true FPR in at least 95% of reference sets (a threshold between order
statistics is bracketed by its two neighbours, so the same holds).
:func:`check_measured_fpr` tests a rate measured on new images against this promise.

Which rule, and how many reference scores. Sampling noise alone explains issue #10's figures:
a threshold from 592 scores has a true FPR anywhere in 0.37-1.96% (95%) around a 1% target,
and a measured rate on ~1000 test normals adds binomial noise on top. Seeded simulations of
ten classes with 1000 test normals each (gamma and normal scores), P(every class within a third
to twice the target) / P(the ten classes' mean within 20%), at 1%: conformal, 592 references
0.18-0.21 / 0.56-0.63; smooth, 592: 0.44-0.51 / 0.78-0.79; conformal, 5000: 0.74-0.78 /
0.95-1.0; smooth, 5000: 0.75-0.85 / 0.93-0.95; a perfect threshold: 0.89 / 1.0 (the test
sets' own binomial noise). More reference scores help most; smoothing helps most when they
are few.

Normalized scores. ``normalize`` is the empirical CDF of the reference scores (the fraction of
reference images that scored at or below the image), in [0, 1]; it saturates at 1 above the
reference maximum. ``p_value`` does not: it estimates the probability that a new normal image
scores above ``s``. Up to the junction ``w``, the score with 20 reference scores above it, it is
``(1 + #{reference > s})/(n + 1)`` at each distinct reference score, joined linearly (the
conformal p-value, made continuous); there the order statistics estimate it to about 22%
(one standard deviation, ``1/sqrt(21)``). Above ``w`` they are too few, and a
peaks-over-threshold model takes over: a generalized Pareto distribution ``G``
(``scipy.stats.genpareto``, maximum likelihood, location 0) fitted to the exceedances
``reference - u`` of the top ``tail_fraction`` (10%, at least 10 scores) over their threshold
``u``, and ``p(s) = p(w) * G.sf(s - u) / G.sf(w - u)``: continuous at ``w``,
and only the model's shape of decay is used, not its level. A negative fitted shape means a
bounded tail (light, like a Gaussian's), which would end at a finite score and call everything
above it impossible (p = 0, saturating again); such a fit is used up to the reference maximum
and continued beyond it with a constant hazard (an exponential tail), the smaller of the fit's
hazard at the maximum and the tail's average (1/mean exceedance), so extrapolated p-values err
on the large side and keep ranking. (Clipping the shape at 0 instead would make every light
tail exponential from the junction on; in simulations that left Gaussian scores' smooth
fpr@1% from 592 references at 0.83x the target, against 1.03x now.) The p-value is
continuous, strictly decreasing from the reference minimum on, and positive for every finite
score in log space; ``surprise = -log10 p`` is computed from the log survival so that it keeps
growing where ``p`` itself underflows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_curve, roc_curve

from anomaly.errors import ConfigError, NotFoundError, expected

_log = logging.getLogger(__name__)
_FPR_NAME = re.compile(r"^fpr@(\d+(?:\.\d+)?)%$")

RULES = ("conformal", "smooth", "pac")
#: Smallest expected number of reference scores above an ``fpr@`` threshold, ``(n + 1) * alpha``.
MIN_EXCEEDANCES = 5
#: Fraction of the reference scores the tail model is fitted to.
TAIL_FRACTION = 0.1
#: Fewest reference scores the tail model is fitted to (when there are that many).
MIN_TAIL = 10
#: The tail model replaces the empirical p-value above the score with this many reference
#: scores above it: there the order statistics are too few to estimate a rate to +-25%.
MODEL_ABOVE = 20
#: Lowest tail shape fitted (a bounded tail); maximum likelihood is irregular below it.
MIN_SHAPE = -0.5
INTERVAL_LEVEL = 0.95
_FORMAT = 2
_METHODS = {"conformal": "conformal", "smooth": "conformal-smooth", "pac": "conformal-pac"}
#: Methods whose thresholds are reference order statistics ("normal-quantile": format 1).
_ORDER_STATISTIC_METHODS = ("conformal", "conformal-pac", "normal-quantile")


@dataclass
class OperatingPoint:
    """A named decision threshold (anomalous when ``score > threshold``)."""

    name: str
    threshold: float
    method: str
    #: Predicted fraction of new normal images flagged: ``(x + 1)/(n + 1)`` for the
    #: order-statistic rules, else ``Calibration.p_value(threshold)`` (module docstring).
    #: Format-1 calibrations stored the in-sample fraction ``x/n`` here.
    expected_fpr: float
    #: Fraction of calibration anomalies flagged, when there were any.
    expected_tpr: float | None = None
    target_fpr: float | None = None
    #: Number of normal reference scores behind the threshold.
    n_reference: int | None = None
    #: 95% Clopper-Pearson interval ``(lo, hi)`` of the FPR from ``reference_flagged`` of
    #: ``n_reference``.
    fpr_interval: tuple[float, float] | None = None
    #: How many reference scores lie above the threshold.
    reference_flagged: int | None = None


@dataclass(frozen=True)
class TailModel:
    """Peaks-over-threshold model of the reference scores' upper tail.

    A generalized Pareto distribution ``G`` (``shape``, ``scale``) fitted to the exceedances
    of the reference over ``threshold``; it takes over from the empirical p-value at
    ``junction`` (the score with ``MODEL_ABOVE`` reference scores above it, or ``threshold``
    if fewer), where the p-value is ``p_junction``:
    ``P(new normal score > s) = p_junction * G.sf(s - threshold) / G.sf(junction - threshold)``
    for ``s >= junction``. With a negative shape (a bounded tail) ``G`` is used up to the
    reference maximum, ``threshold + y_max``, and continued beyond it with the constant hazard
    ``beyond_hazard`` (an exponential tail).
    """

    threshold: float
    junction: float
    p_junction: float
    shape: float
    scale: float
    y_max: float
    beyond_hazard: float
    n_exceedances: int
    method: str  # "genpareto" or "exponential"

    def _log_g(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, np.float64)
        if self.shape >= 0.0:
            return stats.genpareto.logsf(y, self.shape, 0.0, self.scale)
        inside = np.minimum(y, self.y_max)
        return (stats.genpareto.logsf(inside, self.shape, 0.0, self.scale)
                - np.maximum(y - self.y_max, 0.0) * self.beyond_hazard)

    def _inv_log_g(self, log_g: float) -> float:
        if self.shape < 0.0:
            at_max = float(self._log_g(self.y_max))
            if log_g < at_max:
                return self.y_max + (at_max - log_g) / self.beyond_hazard
        return float(stats.genpareto.isf(math.exp(log_g), self.shape, 0.0, self.scale))

    def log_sf(self, scores: np.ndarray) -> np.ndarray:
        """Natural-log p-values ``(N,)`` for scores ``(N,)`` at or above ``junction``."""
        y = np.maximum(np.asarray(scores, np.float64), self.junction) - self.threshold
        return (math.log(self.p_junction) + self._log_g(y)
                - self._log_g(self.junction - self.threshold))

    def isf(self, p: float) -> float:
        """The score whose p-value is ``p`` (``p <= p_junction``)."""
        log_g = math.log(p / self.p_junction) + float(self._log_g(self.junction - self.threshold))
        return self.threshold + self._inv_log_g(log_g)

    @classmethod
    def fit(cls, ref: np.ndarray, tail_fraction: float = TAIL_FRACTION,
            min_tail: int = MIN_TAIL, model_above: int = MODEL_ABOVE) -> TailModel:
        """Fit to sorted reference scores ``(n,)``, ``n >= 2``."""
        n = ref.size
        n_tail = min(n - 1, max(min_tail, math.ceil(tail_fraction * n)))
        u = float(ref[n - n_tail - 1])
        y = ref[ref > u] - u
        # The junction: the highest score with at least model_above scores above it.
        w = max(float(ref[n - 1 - model_above]), u) if y.size > model_above else u
        p_w = (1 + int(np.sum(ref > w))) / (n + 1)
        if y.size == 0:
            # The top scores are all tied: nothing to fit. The reference's spread is a scale
            # that keeps scores above them ranked without calling them impossible.
            spread = float(np.std(ref))
            scale = spread if spread > 0 else _spacing(ref)
            return cls(u, w, p_w, 0.0, scale, 0.0, 1.0 / scale, 0, "exponential")
        y_max = float(y.max())
        shape, scale, method = 0.0, float(np.mean(y)), "exponential"
        if np.unique(y).size >= 3:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                c, _, sc = stats.genpareto.fit(y, floc=0.0)
                if math.isfinite(c) and c < MIN_SHAPE:
                    # Below -1/2 maximum likelihood is irregular (below -1 unbounded): hold
                    # the shape at -1/2 and fit the scale alone.
                    c, _, sc = stats.genpareto.fit(y, f0=MIN_SHAPE, floc=0.0)
            if math.isfinite(c) and math.isfinite(sc) and sc > 0.0 and sc + c * y_max > 0.0:
                shape, scale, method = float(c), float(sc), "genpareto"
        scale = max(scale, _spacing(ref) * 1e-6)
        # Beyond the data a bounded fit's hazard (1/(scale + shape*y) at the maximum) is an
        # extrapolation of its own steepening; the exponential fit's 1/mean exceedance is the
        # tail's average hazard, which is lower for light tails: p-values there err large.
        hazard = min(1.0 / (scale + shape * y_max), 1.0 / max(float(np.mean(y)), 1e-300))
        return cls(u, w, p_w, shape, scale, y_max, hazard, int(y.size), method)


def _spacing(ref: np.ndarray) -> float:
    """A positive score scale: the mean gap between distinct reference scores."""
    values = np.unique(ref)
    if values.size > 1:
        return float((values[-1] - values[0]) / (values.size - 1))
    return max(abs(float(values[0])), 1.0) * 1e-6


@dataclass
class Calibration:
    """Operating points plus the normal reference scores behind the normalized scores.

    Attributes:
        operating_points: by name, e.g. ``{"fpr@1%": OperatingPoint(...)}``.
        default: the name used when a caller names none.
        reference_scores: sorted (pooled, optimism-corrected) normal reference scores
            ``(n_ref,)``.
        tail_model: the upper-tail model behind ``p_value``; ``None`` fits it from the
            reference on first use (read it as :attr:`tail`).
        sources: ``{source: {"n": count, "optimism": shift}}`` of the pooled reference.
        settings: the rule settings ``calibrate`` used (rule, confidence, min_exceedances,
            tail_fraction), reused by ``recalibrate``.
    """

    operating_points: dict[str, OperatingPoint]
    default: str
    reference_scores: np.ndarray = field(repr=False)
    tail_model: TailModel | None = field(default=None, compare=False)
    sources: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reference_scores = np.sort(np.asarray(self.reference_scores, dtype=np.float64))
        self._knots: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def tail(self) -> TailModel:
        """The fitted upper-tail model behind :meth:`p_value`."""
        # Fitted on first use: order-statistic thresholds do not need it, and the fit is most
        # of what calibrate() costs.
        if self.tail_model is None:
            self.tail_model = TailModel.fit(self.reference_scores,
                                            self.settings.get("tail_fraction", TAIL_FRACTION))
        return self.tail_model

    def _body(self) -> tuple[np.ndarray, np.ndarray]:
        """Knots ``(scores, p)`` of the continuous conformal p-value up to the tail junction:
        each distinct score ``v`` with ``(1 + #{ref > v})/(n + 1)``, plus ``p = 1`` one mean
        gap below the minimum."""
        if self._knots is None:
            ref = self.reference_scores
            values = np.unique(ref)
            values = values[values <= self.tail.junction]
            p = (1 + ref.size - np.searchsorted(ref, values, side="right")) / (ref.size + 1)
            self._knots = (np.r_[values[0] - _spacing(ref), values], np.r_[1.0, p])
        return self._knots

    def get(self, name: str | None = None) -> OperatingPoint:
        name = name or self.default
        if name not in self.operating_points:
            raise expected(f"an operating point in {sorted(self.operating_points)}", repr(name),
                           cls=NotFoundError)
        return self.operating_points[name]

    @property
    def n_reference(self) -> int:
        return int(self.reference_scores.size)

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> empirical CDF of the normal reference scores, ``(N,)`` in [0, 1]."""
        ref = self.reference_scores
        return np.searchsorted(ref, np.asarray(scores, dtype=np.float64), side="right") / len(ref)

    def log_p_value(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> natural log of :meth:`p_value`, ``(N,)``, finite and <= 0."""
        s = np.asarray(scores, dtype=np.float64)
        tail, (knot_x, knot_p) = self.tail, self._body()
        out = np.empty(s.shape, np.float64)
        upper = s > tail.junction
        out[upper] = tail.log_sf(s[upper])
        out[~upper] = np.log(np.interp(s[~upper], knot_x, knot_p))
        return out

    def p_value(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> estimated P(new normal score > s), ``(N,)`` in (0, 1].

        Continuous, strictly decreasing above the reference minimum, and never 0 above the
        reference maximum (the tail model; see the module docstring). Underflows to 0 only
        where the log p-value is below about -745; use :meth:`surprise` to rank there.
        """
        return np.exp(self.log_p_value(scores))

    def surprise(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> ``-log10 p_value``, ``(N,)`` >= 0; 2 = as rare as 1 in 100."""
        return -self.log_p_value(scores) / math.log(10.0)

    def threshold_for(self, fpr: float) -> float:
        """The score whose p-value is ``fpr`` (the ``smooth`` rule's threshold)."""
        tail, (knot_x, knot_p) = self.tail, self._body()
        if fpr < tail.p_junction:
            return tail.isf(fpr)
        return float(np.interp(fpr, knot_p[::-1], knot_x[::-1]))

    def decide(self, scores: np.ndarray, name: str | None = None) -> np.ndarray:
        """``(N,)`` bool: True where the score is above the operating point's threshold."""
        return np.asarray(scores) > self.get(name).threshold

    def to_dict(self) -> dict:
        def point(p: OperatingPoint) -> dict:
            d = asdict(p)
            d["fpr_interval"] = list(p.fpr_interval) if p.fpr_interval is not None else None
            return d

        return {
            "format": _FORMAT,
            "default": self.default,
            "operating_points": {k: point(v) for k, v in self.operating_points.items()},
            "reference_scores": [float(s) for s in self.reference_scores],
            "tail": asdict(self.tail),
            "sources": self.sources,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Read :meth:`to_dict`'s output, or a format-1 calibration.json (no tail, no intervals:
        the tail is fitted from its reference scores and the intervals are filled in)."""
        ref = np.sort(np.asarray(data["reference_scores"], dtype=np.float64))
        if data["default"] not in data["operating_points"] or ref.size == 0:
            raise ValueError("calibration without its default operating point or references")
        ops = {}
        for k, v in data["operating_points"].items():
            op = OperatingPoint(**v)
            if op.fpr_interval is not None:
                op.fpr_interval = (float(op.fpr_interval[0]), float(op.fpr_interval[1]))
            if op.n_reference is None and data.get("format", 1) < 2:  # derive the counts
                x = int(np.sum(ref > op.threshold))
                op.n_reference, op.reference_flagged = int(ref.size), x
                op.fpr_interval = clopper_pearson(x, ref.size)
            ops[k] = op
        tail = TailModel(**data["tail"]) if data.get("tail") else None
        sources = data["sources"] if "sources" in data \
            else {"reference": {"n": int(ref.size), "optimism": 0.0}}
        return cls(ops, data["default"], ref, tail, sources, data.get("settings", {}))

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict`: equal iff the calibrations are."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def fpr_name(fpr: float) -> str:
    """0.01 -> ``"fpr@1%"``."""
    return f"fpr@{100 * fpr:g}%"


def parse_fpr_name(name: str) -> float:
    m = _FPR_NAME.match(name)
    if not m:
        raise expected("an operating point like 'fpr@1%'", repr(name), cls=ConfigError)
    return float(m.group(1)) / 100


def clopper_pearson(k: int, n: int, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """Exact binomial interval ``(lo, hi)`` for ``k`` successes in ``n`` trials."""
    a = (1 - level) / 2
    lo = float(stats.beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    hi = float(stats.beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def required_reference(fpr: float, min_exceedances: int = MIN_EXCEEDANCES) -> int:
    """Fewest reference scores that resolve a target FPR: ``(n + 1) * fpr >= min_exceedances``."""
    return max(2, math.ceil(round(min_exceedances / fpr, 9)) - 1)


def estimate_optimism(in_sample_scores: np.ndarray, held_out_scores: np.ndarray, *,
                      quantile: float = 1 - TAIL_FRACTION) -> float:
    """How much lower in-sample normal scores are than held-out ones, at the tail's start.

    Args:
        in_sample_scores: ``(n_in,)`` scores of normal images the model was fitted on.
        held_out_scores: ``(n_out,)`` scores of normal images it never saw.
        quantile: where the two distributions are compared; the default 0.9 is the start of
            the tail the thresholds come from, estimated from many more scores than the
            thresholds themselves.

    Returns:
        ``Q_out(quantile) - Q_in(quantile)``, the shift to pass as ``optimism`` for the
        in-sample source (positive when in-sample scores are optimistic).
    """
    a = _scores(in_sample_scores, "in-sample normal scores")
    b = _scores(held_out_scores, "held-out normal scores")
    if not 0.0 < quantile < 1.0:
        raise expected("a quantile in (0, 1)", quantile, cls=ConfigError)
    return float(np.quantile(b, quantile) - np.quantile(a, quantile))


def _scores(values, what: str, minimum: int = 2) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise expected(f"at least {minimum} finite {what}", type(values).__name__,
                       cls=ConfigError) from None
    if arr.ndim != 1 or arr.size < minimum or not np.isfinite(arr).all():
        received = f"shape {arr.shape}" if np.isfinite(arr).all() else "non-finite values"
        raise expected(f"at least {minimum} finite {what}", received, cls=ConfigError)
    return arr


def _pool(normal_scores, optimism) -> tuple[np.ndarray, dict]:
    """Pool ``{source: scores}`` (or one array) after each source's optimism shift."""
    if isinstance(normal_scores, Mapping):
        if not normal_scores:
            raise expected("at least one source of normal reference scores", "none",
                           cls=ConfigError)
        parts = {str(k): _scores(v, f"normal reference scores in source {k!r}", 1)
                 for k, v in normal_scores.items()}
    else:
        parts = {"reference": _scores(normal_scores, "normal validation scores")}
    if isinstance(optimism, Mapping):
        unknown = sorted(set(map(str, optimism)) - set(parts))
        if unknown:
            raise expected(f"optimism for sources in {sorted(parts)}", unknown, cls=ConfigError)
        shifts = {k: optimism.get(k, 0.0) for k in parts}
    else:
        shifts = dict.fromkeys(parts, optimism)
    for k, v in shifts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise expected(f"a finite optimism shift for source {k!r}", repr(v), cls=ConfigError)
    pooled = np.sort(np.concatenate([parts[k] + float(shifts[k]) for k in parts]))
    if pooled.size < 2:
        raise expected("at least 2 finite normal validation scores", f"{pooled.size}",
                       cls=ConfigError)
    return pooled, {k: {"n": int(parts[k].size), "optimism": float(shifts[k])} for k in parts}


def _threshold_from_sklearn(t: float) -> float:
    # sklearn's curves flag score >= t; ours flag score > threshold. Float32 scores carried in
    # float64 have no value strictly between nextafter(t, -inf) and t, so both rules agree.
    return float(np.nextafter(np.float64(t), -np.inf))


def _fpr_threshold(cal: Calibration, fpr: float, rule: str, confidence: float,
                   min_exceedances: int, force: bool) -> float:
    ref = cal.reference_scores
    n = ref.size
    need = required_reference(fpr, min_exceedances)
    if n < need:
        if not force:
            raise expected(
                f"at least {need} normal reference scores to resolve {fpr_name(fpr)} "
                f"({min_exceedances} expected false positives among them)", f"{n}",
                hint="Use more normal images, choose a larger target FPR, or force it "
                     "(--force-calibration; force=True in Python)", cls=ConfigError)
        _log.info("%d normal reference images cannot resolve a %.2f%% FPR (%d needed); %s.",
                  n, 100 * fpr, need, "the tail model extrapolates" if rule == "smooth"
                  else "the threshold rests on their top few scores, or is their maximum")
    if rule == "smooth":
        t = cal.threshold_for(fpr)
        # Where the model and the reference disagree (ties: a point mass just above t, which
        # a continuous interpolation cannot see), the reference wins: raise t until its count
        # of flagged reference scores is not implausibly high for the target, i.e. the
        # target is not below that count's Clopper-Pearson interval.
        x_max = math.floor(fpr * n)
        while x_max < n and clopper_pearson(x_max + 1, n)[0] <= fpr:
            x_max += 1
        return max(t, float(ref[n - 1 - x_max])) if x_max < n else t
    if rule == "conformal":
        # ceil((n + 1)(1 - fpr)) = n + 1 - floor((n + 1) fpr); rounding keeps 0.05 * 20 at 1.
        k = n + 1 - math.floor(round((n + 1) * fpr, 9))
    else:  # pac: FPR(x_(k)) <= fpr  <=>  Binomial(n, 1 - fpr) < k
        k = int(stats.binom.ppf(confidence, n, 1 - fpr)) + 1
        if k > n and not force:
            raise expected(
                f"more normal reference scores for {fpr_name(fpr)} at confidence {confidence}",
                f"{n}", hint="Pass more scores, lower the confidence or use rule='conformal'",
                cls=ConfigError)
    return float(ref[min(k, n) - 1])


def _point(cal: Calibration, name: str, threshold: float, method: str,
           target_fpr: float | None = None, expected_tpr: float | None = None) -> OperatingPoint:
    ref = cal.reference_scores
    n, x = int(ref.size), int(np.sum(ref > threshold))
    if method in ("conformal", "conformal-pac"):
        # Exact mean of Beta(x + 1, n - x), the FPR of an order statistic, whatever the
        # distribution; the tail model's estimate would add its own bias.
        exp_fpr = (x + 1) / (n + 1)
    else:
        exp_fpr = float(cal.p_value(np.array([threshold]))[0])
    return OperatingPoint(name, threshold, method, exp_fpr, expected_tpr, target_fpr, n,
                          clopper_pearson(x, n), x)


def calibrate(normal_scores, anomaly_scores: np.ndarray | None = None, *,
              target_fprs: tuple[float, ...] = (0.01,), default: str | None = None,
              rule: str = "conformal", confidence: float = 0.9,
              optimism: float | Mapping[str, float] = 0.0,
              min_exceedances: int = MIN_EXCEEDANCES, force: bool = False,
              tail_fraction: float = TAIL_FRACTION) -> Calibration:
    """Choose thresholds from normal reference scores (and optional labelled anomalies).

    Args:
        normal_scores: ``(n_normal,)`` scores of held-out normal images, or a mapping
            ``{source: (n_source,) scores}`` pooled after ``optimism``.
        anomaly_scores: ``(n_anomalies,)`` scores of labelled anomalies, or ``None``.
        target_fprs: false-positive rates for ``fpr@P%`` operating points, each in (0, 1).
        default: default operating point name; the first ``fpr@`` point if ``None``.
        rule: ``"conformal"``, ``"smooth"`` or ``"pac"`` (module docstring).
        confidence: for ``"pac"``, the probability over reference sets that FPR <= target.
        optimism: shift added to every source's scores, or ``{source: shift}``; see
            :func:`estimate_optimism`.
        min_exceedances: a target needs ``(n + 1) * fpr >= min_exceedances``.
        force: calibrate targets the reference cannot resolve instead of raising ConfigError.
        tail_fraction: top fraction of the reference the tail model is fitted to.

    Raises:
        ConfigError: bad scores or settings, or an unresolvable target without ``force``.
    """
    if rule not in RULES:
        raise expected(f"a threshold rule in {list(RULES)}", repr(rule), cls=ConfigError)
    if not 0.0 < confidence < 1.0:
        raise expected("a confidence in (0, 1)", confidence, cls=ConfigError)
    if not 0.0 < tail_fraction < 1.0:
        raise expected("a tail fraction in (0, 1)", tail_fraction, cls=ConfigError)
    if isinstance(min_exceedances, bool) or not isinstance(min_exceedances, int) \
            or min_exceedances < 1:
        raise expected("min_exceedances as an integer >= 1", repr(min_exceedances),
                       cls=ConfigError)
    normal, sources = _pool(normal_scores, optimism)
    if not target_fprs:
        raise expected("at least one target FPR", "none", cls=ConfigError)
    for fpr in target_fprs:
        if isinstance(fpr, bool) or not isinstance(fpr, numbers.Real) or not 0.0 < fpr < 1.0:
            raise expected("target FPRs in (0, 1), e.g. 0.01", fpr, cls=ConfigError)
    settings = {"rule": rule, "confidence": float(confidence),
                "min_exceedances": int(min_exceedances), "tail_fraction": float(tail_fraction)}
    cal = Calibration({}, "", normal, None, sources, settings)
    points: dict[str, OperatingPoint] = {}
    for fpr in target_fprs:
        thr = _fpr_threshold(cal, float(fpr), rule, confidence, min_exceedances, force)
        points[fpr_name(fpr)] = _point(cal, fpr_name(fpr), thr, _METHODS[rule], float(fpr))
    if anomaly_scores is not None and len(anomaly_scores):
        anomalies = _scores(anomaly_scores, "calibration anomaly scores", 1)
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
            points[name] = _point(cal, name, thr, method,
                                  expected_tpr=float(np.mean(anomalies > thr)))
    default = default or next(iter(points))
    if default not in points:
        raise expected(f"a default operating point in {sorted(points)}", repr(default),
                       cls=ConfigError)
    for p in points.values():
        if not math.isfinite(p.threshold):
            raise ConfigError(f"Calibration produced a non-finite threshold for {p.name}.")
    cal.operating_points, cal.default = points, default
    return cal


@dataclass(frozen=True)
class FPRCheck:
    """A false-positive rate measured on new normal images, against an operating point."""

    name: str
    flagged: int
    n: int
    measured_fpr: float
    #: 95% Clopper-Pearson interval of the measured rate.
    measured_interval: tuple[float, float]
    expected_fpr: float
    #: The calibration's 95% interval of the true FPR.
    fpr_interval: tuple[float, float] | None
    #: Mean of the rate the calibration predicts on ``n`` new normal images.
    predicted_fpr: float
    #: Central 95% range of that rate (``1 - level`` in general).
    predicted_range: tuple[float, float]
    #: Two-sided p-value of ``flagged`` under the calibration's predictive distribution.
    p_value: float
    #: True when ``p_value < level``: the new images do not behave like the reference.
    outside: bool
    level: float

    def message(self) -> str:
        """One line for a warning, e.g. in ``anomaly evaluate``."""
        verdict = "outside" if self.outside else "within"
        return (f"{self.name}: measured FPR {self.measured_fpr:.2%} ({self.flagged} of {self.n} "
                f"normal images) is {verdict} the {1 - self.level:.0%} range "
                f"{self.predicted_range[0]:.2%}-{self.predicted_range[1]:.2%} predicted around "
                f"{self.predicted_fpr:.2%} (p = {self.p_value:.3g})")


def check_measured_fpr(point: OperatingPoint, flagged: int, n: int, *,
                       level: float = 0.05) -> FPRCheck:
    """Test a measured FPR (``flagged`` of ``n`` new normal images) against an operating point.

    The test accounts for both sources of noise: the threshold's own (its true FPR is uncertain
    because it came from ``n_reference`` images) and the new sample's. For a threshold at an
    order statistic with ``x`` reference scores above it, and new images exchangeable with the
    reference, the true FPR is ``Beta(x + 1, n_ref - x)`` and the count flagged among ``n`` new
    images is exactly beta-binomial ``(n, x + 1, n_ref - x)``: used for the order-statistic
    methods (``conformal``, ``conformal-pac`` and format 1's ``normal-quantile``); for the
    others ``a = expected_fpr * (n_ref + 1)``, ``b = n_ref + 1 - a``. The p-value is two-sided (twice the smaller tail, at most 1), so ``outside``
    is wrong at most ``level`` of the time when nothing changed. A plain binomial test against
    ``expected_fpr`` would ignore the threshold's noise and, with a few thousand new images,
    warn about most correct calibrations. Without ``n_reference`` (hand-made points) it is that
    binomial test.
    """
    for what, v in (("n", n), ("flagged", flagged)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise expected(f"an integer {what}", repr(v), cls=ConfigError)
    if n < 1 or not 0 <= flagged <= n:
        raise expected("0 <= flagged <= n with n >= 1", f"flagged={flagged}, n={n}",
                       cls=ConfigError)
    if not 0.0 < level < 1.0:
        raise expected("a level in (0, 1)", level, cls=ConfigError)
    flagged, n = int(flagged), int(n)
    p0 = min(max(point.expected_fpr, 1e-300), 1.0 - 1e-12)
    counts = np.arange(n + 1)
    if point.n_reference and point.reference_flagged is not None \
            and point.method in _ORDER_STATISTIC_METHODS:
        x = point.reference_flagged
        pmf = stats.betabinom.pmf(counts, n, x + 1, point.n_reference - x)
    elif point.n_reference:
        a = max(p0 * (point.n_reference + 1), 1e-3)
        pmf = stats.betabinom.pmf(counts, n, a, max(point.n_reference + 1 - a, 1e-3))
    else:
        pmf = stats.binom.pmf(counts, n, p0)
    cdf = np.cumsum(pmf)
    below, above = float(cdf[flagged]), float(1.0 - (cdf[flagged - 1] if flagged else 0.0))
    pv = min(1.0, 2.0 * min(below, above))
    lo = int(np.searchsorted(cdf, level / 2 * (1 - 1e-12)))
    hi = int(min(np.searchsorted(cdf, (1 - level / 2) * (1 - 1e-12)), n))
    return FPRCheck(point.name, flagged, n, flagged / n, clopper_pearson(flagged, n),
                    point.expected_fpr, point.fpr_interval, float(pmf @ counts) / n,
                    (lo / n, hi / n), pv, pv < level, level)


def recalibrate(calibration: Calibration, normal_scores, anomaly_scores: np.ndarray | None = None,
                target_fprs: tuple[float, ...] | None = None, *, default: str | None = None,
                keep_reference: bool = False, optimism: float | Mapping[str, float] = 0.0,
                force: bool = False, **settings) -> tuple[Calibration, dict]:
    """New thresholds from new normal scores, without retraining the model.

    Args:
        calibration: the current calibration; its targets, default point and rule settings
            are kept unless given here.
        normal_scores: ``(n,)`` new normal reference scores, or ``{source: scores}``.
        anomaly_scores: ``(n_anomalies,)`` labelled anomaly scores for ``f1-max``/``youden``;
            without them those points are dropped (listed in the lineage).
        target_fprs: targets for the ``fpr@`` points; the current ones if ``None``.
        default: default point; the current one if it still exists, else the first point.
        keep_reference: pool the current reference scores (as source ``"previous"``) with the
            new ones instead of replacing them.
        optimism, force: as for :func:`calibrate`.
        **settings: ``rule``, ``confidence``, ``min_exceedances``, ``tail_fraction`` overrides.

    Returns:
        ``(new_calibration, lineage)``. ``lineage`` is JSON-ready: ``parent_sha256`` and
        ``sha256`` (:meth:`Calibration.fingerprint`), ``reference_sha256`` of the new pooled
        scores, ``n_reference`` before/after, the thresholds of every point before/after,
        ``added``/``dropped`` points, the settings and ``created_at`` (UTC). Equal inputs give
        an equal calibration (same ``sha256``), whatever the order of the scores.
    """
    unknown = sorted(set(settings) - {"rule", "confidence", "min_exceedances", "tail_fraction"})
    if unknown:
        raise expected("settings among rule, confidence, min_exceedances, tail_fraction",
                       unknown, cls=ConfigError)
    merged = {**calibration.settings, **settings}
    if target_fprs is None:
        target_fprs = tuple(p.target_fpr for p in calibration.operating_points.values()
                            if p.target_fpr is not None)
    if keep_reference:
        sources = dict(normal_scores) if isinstance(normal_scores, Mapping) \
            else {"new": normal_scores}
        if "previous" in sources:
            raise expected("no new source named 'previous' with keep_reference", "'previous'",
                           cls=ConfigError)
        sources["previous"] = calibration.reference_scores
        if isinstance(optimism, Mapping):
            optimism = {**optimism, "previous": 0.0}
        else:
            optimism = {k: (0.0 if k == "previous" else optimism) for k in sources}
        normal_scores = sources
    has_anomalies = anomaly_scores is not None and len(anomaly_scores) > 0
    names = [fpr_name(f) for f in target_fprs] + (["f1-max", "youden"] if has_anomalies else [])
    if default is None:
        default = calibration.default if calibration.default in names else None
    new = calibrate(normal_scores, anomaly_scores, target_fprs=target_fprs, default=default,
                    optimism=optimism, force=force, **merged)
    old_pts, new_pts = calibration.operating_points, new.operating_points
    lineage = {
        "parent_sha256": calibration.fingerprint(),
        "sha256": new.fingerprint(),
        "reference_sha256": hashlib.sha256(new.reference_scores.tobytes()).hexdigest(),
        "n_reference": {"before": calibration.n_reference, "after": new.n_reference},
        "sources": new.sources,
        "settings": new.settings,
        "thresholds": {k: {"before": old_pts[k].threshold if k in old_pts else None,
                           "after": new_pts[k].threshold if k in new_pts else None}
                       for k in dict.fromkeys([*old_pts, *new_pts])},
        "added": [k for k in new_pts if k not in old_pts],
        "dropped": [k for k in old_pts if k not in new_pts],
        "default": {"before": calibration.default, "after": new.default},
        "created_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    return new, lineage


__all__ = ["INTERVAL_LEVEL", "MIN_EXCEEDANCES", "RULES", "Calibration", "FPRCheck",
           "OperatingPoint", "TailModel", "calibrate", "check_measured_fpr", "clopper_pearson",
           "estimate_optimism", "fpr_name", "parse_fpr_name", "recalibrate",
           "required_reference"]
