"""The report's numbers and pictures-to-be, as plain data: no plotting here.

:func:`analyze` takes a fitted detector, its labelled test images and their scores and returns
a :class:`ReportData`; :mod:`anomaly.report.figures` only draws it. Everything that runs the
model (reconstructions, codes, decoded grids) happens here, once, so a figure cannot silently
compute something different from the table beside it. This module imports neither matplotlib
nor jinja2 (a test checks it).

Statistics (issue #10):

- **FPR checks.** For every operating point the expected FPR (measured on the normal validation
  images at calibration) and the measured FPR (on the normal test images), each with a 95%
  Clopper-Pearson (exact binomial) interval. They *disagree* when the expected FPR lies outside
  the measured FPR's interval: then the validation images were not representative of the test
  set, or there were too few of them to resolve the target.
- **Ranking.** AUROC with a seeded bootstrap 95% interval (percentile method, resampling test
  images with replacement), the partial AUROC up to 10% FPR as scikit-learn computes it
  (McClish-standardized: 0.5 = chance, 1 = perfect, over FPR in [0, 0.1]), average precision
  with anomalies as positives and with *normal* images as positives (whose chance level is the
  fraction of normal test images, not the ~0.9 of the anomalies).
- **Uniformity.** On normal test images the normalized score (empirical CDF of the validation
  scores) should be uniform on [0, 1] when validation and test normals come from the same
  distribution; Kolmogorov-Smirnov statistic against U(0, 1), with the two-sample p-value
  that allows for the reference being a finite sample.
- **Localization.** Where the test images have ground-truth masks (MVTec AD layout), the pixel
  AUROC and PRO of their error maps (:mod:`anomaly.localization`), overall and per defect type.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from anomaly.errors import DataError, expected

#: Upper FPR of the partial AUROC.
PARTIAL_MAX_FPR = 0.1
#: Bootstrap resamples of the AUROC interval.
N_BOOTSTRAP = 1000
#: Images of each kind used by the pictures of normal images (affine, denoising).
POOL = 200
#: Defect types in the error-map-over-mask figure (two images each: its columns stay legible).
MASK_DEFECTS = 8
#: Test images scored per call for the pixel metrics' error maps (bounds their memory).
MAP_CHUNK = 256
#: The finer decoding grid of the affine-vae picture, and how many test images it shows.
DECODE_SCALE = 2
DECODE_EXAMPLES = 4


@dataclass(frozen=True)
class Missing:
    """Stands in for a part of the report that does not apply; ``reason`` says why."""

    reason: str


NOT_COMPUTED = Missing("Not computed.")


# -- statistics ----------------------------------------------------------------------------------


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for a proportion of ``k`` successes in ``n`` trials.

    Returns ``(low, high)`` within [0, 1]; ``(0.0, 1.0)`` when ``n == 0`` (nothing is known).
    """
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise expected(f"a count between 0 and n={n}", k, cls=DataError)
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


@dataclass
class FprCheck:
    """Expected vs measured false-positive rate of one operating point.

    ``expected_*`` come from the ``n_val`` normal validation images the threshold was chosen
    on, ``measured_*`` from the ``n_normal`` normal test images; intervals are 95% exact.
    """

    name: str
    default: bool
    threshold: float
    expected_fpr: float
    n_val: int
    expected_ci: tuple[float, float]
    measured_fpr: float | None
    fp: int
    n_normal: int
    measured_ci: tuple[float, float] | None
    recall: float | None

    @property
    def agrees(self) -> bool | None:
        """Whether the expected FPR lies inside the measured FPR's interval (None: no normal
        test images to measure on)."""
        if self.measured_ci is None:
            return None
        lo, hi = self.measured_ci
        return bool(lo <= self.expected_fpr <= hi)


def fpr_checks(scores: np.ndarray, y: np.ndarray, calibration) -> list[FprCheck]:
    """One :class:`FprCheck` per operating point of ``calibration``; scores and labels ``(N,)``."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(int)
    ref = np.asarray(calibration.reference_scores, np.float64)
    normal = scores[y == 0]
    anomalies = scores[y == 1]
    out = []
    for name, op in calibration.operating_points.items():
        k_val = int(np.sum(ref > op.threshold))
        fp = int(np.sum(normal > op.threshold))
        n = len(normal)
        out.append(FprCheck(
            name=name, default=name == calibration.default, threshold=float(op.threshold),
            expected_fpr=float(op.expected_fpr), n_val=len(ref),
            expected_ci=clopper_pearson(k_val, len(ref)),
            measured_fpr=fp / n if n else None, fp=fp, n_normal=n,
            measured_ci=clopper_pearson(fp, n) if n else None,
            recall=float(np.mean(anomalies > op.threshold)) if len(anomalies) else None))
    return out


def _tie_groups(scores: np.ndarray) -> np.ndarray:
    """Index of each score's value among the sorted distinct values, ``(N,)``."""
    return np.unique(scores, return_inverse=True)[1].ravel()


def _rowwise_bincount(index: np.ndarray, weights: np.ndarray | None, size: int) -> np.ndarray:
    """``np.bincount`` of each row of ``index`` ``(B, N)`` at once -> ``(B, size)``."""
    offset = (np.arange(len(index))[:, None] * size + index).ravel()
    w = None if weights is None else weights.ravel()
    return np.bincount(offset, weights=w, minlength=len(index) * size).reshape(len(index), size)


def _weighted_auroc(groups: np.ndarray, y: np.ndarray, w: np.ndarray, n_groups: int):
    """AUROC (ties count one half) of images weighted by ``w`` ``(B, N)`` -> ``(B,)``."""
    index = np.broadcast_to(groups, w.shape)
    pos = _rowwise_bincount(index, w * y, n_groups)
    neg = _rowwise_bincount(index, w * (1 - y), n_groups)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each distinct value
    num = np.sum(pos * (below + 0.5 * neg), axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def bootstrap_auroc(y: np.ndarray, scores: np.ndarray, *, n_boot: int = N_BOOTSTRAP,
                    seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC of scores ``(N,)`` against labels ``(N,)``.

    Test images are resampled with replacement (``n_boot`` times, seeded); resamples holding
    a single class are dropped. Ties count one half, as in ``roc_auc_score``.
    """
    y = np.asarray(y).astype(np.float64)
    n = len(y)
    groups = _tie_groups(np.asarray(scores, np.float64))
    n_groups = int(groups.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, 50):  # chunks keep the (B, N) weights small
        b = min(50, n_boot - start)
        w = _rowwise_bincount(rng.integers(0, n, (b, n)), None, n).astype(np.float64)
        values.append(_weighted_auroc(groups, y, w, n_groups))
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    a = (1 - confidence) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


@dataclass
class Ranking:
    """How well the scores rank anomalies above normal images (see the module docstring)."""

    auroc: float
    auroc_ci: tuple[float, float]
    n_bootstrap: int
    partial_auroc: float
    partial_max_fpr: float
    average_precision: float
    average_precision_normal: float
    normal_fraction: float


def ranking(y: np.ndarray, scores: np.ndarray, *, seed: int = 0,
            n_boot: int = N_BOOTSTRAP) -> Ranking | Missing:
    """:class:`Ranking` of scores ``(N,)`` against labels ``(N,)`` (1 = anomaly)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, np.float64)
    if not 0 < y.sum() < len(y):
        return Missing("The test images are all normal or all anomalous: no ranking to show.")
    return Ranking(
        auroc=float(roc_auc_score(y, scores)),
        auroc_ci=bootstrap_auroc(y, scores, n_boot=n_boot, seed=seed), n_bootstrap=n_boot,
        partial_auroc=float(roc_auc_score(y, scores, max_fpr=PARTIAL_MAX_FPR)),
        partial_max_fpr=PARTIAL_MAX_FPR,
        average_precision=float(average_precision_score(y, scores)),
        # Normal images as positives: lower score = more normal.
        average_precision_normal=float(average_precision_score(1 - y, -scores)),
        normal_fraction=float(np.mean(y == 0)))


@dataclass
class Uniformity:
    """Normalized scores ``(n,)`` of the normal test images and their fit to U(0, 1).

    ``ks_statistic``/``ks_pvalue``: ``scipy.stats.kstest`` against U(0, 1), which takes the
    reference as exact. The reference is itself a sample of ``n_reference`` validation
    scores, so ``ks2_pvalue`` (``ks_2samp`` of the test normals' raw scores against the
    reference scores: the same statistic up to ties) is the one to judge by.
    """

    normalized: np.ndarray
    ks_statistic: float
    ks_pvalue: float
    ks2_pvalue: float
    n_reference: int


def uniformity(normal_scores: np.ndarray, calibration) -> Uniformity | Missing:
    """How uniform the normalized scores of normal test images (raw scores ``(n,)``) are."""
    from scipy.stats import ks_2samp, kstest

    raw = np.asarray(normal_scores, np.float64)
    if len(raw) < 5:
        return Missing(f"Too few normal test images ({len(raw)}) to check uniformity.")
    u = calibration.normalize(raw)
    ref = np.asarray(calibration.reference_scores, np.float64)
    one = kstest(u, "uniform")
    two = ks_2samp(raw, ref)
    return Uniformity(np.sort(u), float(one.statistic), float(one.pvalue), float(two.pvalue),
                      len(ref))


# -- images ---------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A reconstruction grid: ``k`` test images with their reconstructions and error maps.

    ``x``, ``reconstruction``: ``(k, H, W)`` or ``(k, H, W, C)`` in [0, 1]; ``error_map``:
    ``(k, H, W)`` (channels averaged); ``scores``, ``flagged``, ``labels``: ``(k,)``.
    """

    title: str
    x: np.ndarray
    reconstruction: np.ndarray
    error_map: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    labels: list[str]


@dataclass
class Rows:
    """Rows of images side by side: ``rows[i]`` is ``(k, H, W)`` or ``(k, H, W, C)``."""

    title: str
    rows: list[np.ndarray]
    row_labels: list[str]
    col_labels: list[str]
    xlabel: str
    numbers: dict = field(default_factory=dict)


@dataclass
class MaskSet:
    """Test images of each defect type with their error maps and ground-truth masks.

    ``x``: ``(k, H, W)`` or ``(k, H, W, C)`` in [0, 1]; ``error_map``: ``(k, H, W)`` (channels
    averaged); ``masks``: ``(k, H, W)`` bool, True on defect pixels; ``scores``, ``flagged``:
    ``(k,)``; ``defects``: each image's defect type; ``picks``: why it was picked ("highest"
    or "median" score of its type). ``vmax``: the error maps' shared colour scale.
    """

    title: str
    x: np.ndarray
    error_map: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    defects: list[str]
    picks: list[str]
    vmax: float


@dataclass
class Upscaled:
    """Test images decoded at their size and on a ``scale`` times finer grid.

    ``x``, ``reconstruction``: ``(k, H, W)`` or ``(k, H, W, C)``; ``upscaled``:
    ``(k, scale*H, scale*W[, C])``, all in [0, 1]; ``labels``, ``scores``: ``(k,)``.
    """

    title: str
    x: np.ndarray
    reconstruction: np.ndarray
    upscaled: np.ndarray
    scale: int
    labels: list[str]
    scores: np.ndarray


@dataclass
class Latent:
    """2-D view of the codes of ``n`` test images: ``points`` ``(n, 2)``, ``classes`` ``(n,)``."""

    points: np.ndarray
    classes: np.ndarray
    title: str
    xlabel: str
    ylabel: str
    projection: str


@dataclass
class Manifold:
    """Images decoded on a grid: ``images`` ``(rows * cols, H, W[, C])`` row-major."""

    images: np.ndarray
    rows: int
    cols: int
    x_values: np.ndarray
    y_values: np.ndarray | None
    xlabel: str
    ylabel: str
    title: str


@dataclass
class ScoreParts:
    """The standardized parts of ``mse+knn`` (``(n, 2)``: ``(log mse - m1) / s1`` and
    ``(log knn - m2) / s2``) or ``mse+knn+tp`` (``(n, 3)``, plus ``(log tp - m3) / s3``) for
    ``n`` test images; the score is their sum."""

    parts: np.ndarray
    y: np.ndarray
    threshold: float
    operating_point: str


@dataclass
class Training:
    """Per-epoch losses and the epoch whose weights were kept (lowest ``val_loss``)."""

    history: pd.DataFrame
    epochs: np.ndarray
    kept_epoch: int | None
    variational: bool


def channels_mean(a: np.ndarray) -> np.ndarray:
    """``(k, H, W, C)`` -> ``(k, H, W)`` by averaging channels; ``(k, H, W)`` unchanged."""
    a = np.asarray(a)
    return a.mean(axis=-1) if a.ndim == 4 else a


def kept_epoch(history: pd.DataFrame) -> int | None:
    """The epoch (as numbered in ``history``) with the lowest ``val_loss``: early stopping
    restores its weights. ``None`` without validation losses."""
    if "val_loss" not in history or not history["val_loss"].notna().any():
        return None
    i = int(np.nanargmin(history["val_loss"].to_numpy(np.float64)))
    epochs = history["epoch"].to_numpy() if "epoch" in history else np.arange(1, len(history) + 1)
    return int(epochs[i])


# -- the whole report ------------------------------------------------------------------------------


@dataclass
class ReportData:
    """Everything the figures and the page show. Arrays ``(N,)`` are over all test images."""

    model: str
    score_name: str
    error_name: str
    code_dim: int
    variational: bool
    denoise: float
    dataset: str
    normal_classes: tuple[int, ...]
    class_names: tuple[str, ...] | None
    image_shape: tuple[int, ...]
    y: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    calibration: object
    evaluation: object
    ranking: Ranking | Missing
    fpr_checks: list[FprCheck]
    uniformity: Uniformity | Missing
    groups: dict[str, ImageSet | Missing]
    error_vmax: float
    latent: Latent
    tsne: Latent | Missing
    kmeans_ari: dict
    score_parts: ScoreParts | Missing
    manifold: Manifold | Missing
    interpolation: Rows | Missing
    affine: Rows | Missing
    denoising: Rows | Missing
    training: Training | Missing
    pixel: dict | Missing = NOT_COMPUTED
    mask_errors: MaskSet | Missing = NOT_COMPUTED
    upscaled: Upscaled | Missing = NOT_COMPUTED
    extra: dict = field(default_factory=dict)

    def class_label(self, c: int, with_role: bool = True) -> str:
        """``"3: dress (anomaly)"`` for class 3 (``"3"`` alone when it has no other name)."""
        names = self.class_names
        name = names[c] if names is not None and 0 <= c < len(names) else str(c)
        label = f"{c}: {name}" if name != str(c) else str(c)
        if not with_role:
            return label
        return f"{label} ({'normal' if c in self.normal_classes else 'anomaly'})"


def _kmeans_ari(codes, classes, k, seed) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(codes)
    return float(adjusted_rand_score(classes, pred))


def _tsne(codes: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.manifold import TSNE

    n = len(codes)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    iters = {"max_iter": 500} if "max_iter" in inspect.signature(TSNE).parameters \
        else {"n_iter": 500}
    # Barnes-Hut: 0.36 s for 300 codes of 16 here, the exact gradient 0.72 s (scikit-learn 1.9).
    tsne = TSNE(2, perplexity=perplexity, init="pca", method="barnes_hut", random_state=seed,
                **iters)
    return tsne.fit_transform(codes.astype(np.float64)), perplexity


def _decode(detector, z: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Decoded images for codes ``(n, d)``: the sigmoid of the decoder's logits."""
    logits = np.asarray(detector.model_.decode_logits(np.asarray(z, np.float32), normalize),
                        np.float32)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow warnings


def _latent(codes, classes, what: str) -> Latent:
    n, d = codes.shape
    if d == 1:
        pts = np.c_[codes[:, 0], classes + np.random.default_rng(0).uniform(-0.2, 0.2, n)]
        return Latent(pts, classes, f"Latent {what} of {n} test images (1-D code)", "z[0]",
                      "class (jittered)", "none (1-D code)")
    if d == 2:
        return Latent(codes, classes, f"Latent {what} of {n} test images (2-D code, shown "
                      "directly)", "z[0]", "z[1]", "none (2-D code)")
    from sklearn.decomposition import PCA

    pca = PCA(2, random_state=0)
    pts = pca.fit_transform(codes)
    var = pca.explained_variance_ratio_
    return Latent(pts, classes, f"PCA projection of the {d}-D latent {what} of {n} test images "
                  f"({var.sum():.0%} of the variance)", f"PC1 ({var[0]:.0%})",
                  f"PC2 ({var[1]:.0%})", f"PCA ({var.sum():.0%} of the variance)")


def _manifold(detector, codes_normal: np.ndarray, d: int) -> Manifold:
    """Codes on a grid of standard normal quantiles 0.05..0.95: on the axes of a 1-/2-D code,
    else along the top two principal directions of the normal test codes (in their std)."""
    n = 12 if d <= 2 else 10
    q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, n)])
    how = "over the latent axes" if d <= 2 else "along the top 2 principal directions"
    if d == 1:
        zz, qy = q[:, None], None
        xl, yl = "z[0] (standard normal quantiles 0.05..0.95)", ""
    elif d == 2:
        zz, qy = np.array([[a, b] for b in q[::-1] for a in q]), q[::-1]
        xl, yl = "z[0] (standard normal quantiles)", "z[1] (standard normal quantiles)"
    else:
        mean = codes_normal.mean(axis=0)
        _, s, vt = np.linalg.svd(codes_normal - mean, full_matrices=False)
        std = s[:2] / np.sqrt(max(len(codes_normal) - 1, 1))
        zz = np.array([mean + a * std[0] * vt[0] + b * std[1] * vt[1]
                       for b in q[::-1] for a in q])
        qy = q[::-1]
        xl = "PC1 of the normal codes (in its std, normal quantiles)"
        yl = "PC2 of the normal codes (in its std, normal quantiles)"
    rows = 1 if qy is None else n
    return Manifold(_decode(detector, zz), rows, n, q, qy, xl, yl,
                    f"Images decoded on a {n}x{rows} grid of latent values {how} ({d}-D code)")


def _score_parts(detector, x: np.ndarray, y: np.ndarray, op) -> ScoreParts | Missing:
    """The raw parts from the detector's scorer, standardized as the score does."""
    if detector.score not in ("mse+knn", "mse+knn+tp"):
        return Missing(f"Only for the mse+knn and mse+knn+tp scores (this detector scores "
                       f"with {detector.score}).")
    raw = detector.scorer.parts(x)
    std = detector.standardizer_
    parts = (raw - np.asarray(std.mean)) / np.asarray(std.std)
    return ScoreParts(parts, np.asarray(y), float(op.threshold), op.name)


def _training(history, variational: bool) -> Training | Missing:
    if history is None or (isinstance(history, dict) and not history):
        return Missing("No training history (the artifact has no history.csv).")
    if isinstance(history, dict):
        n = max(len(v) for v in history.values())
        history = pd.DataFrame({k: list(v) + [None] * (n - len(v)) for k, v in history.items()})
    epochs = history["epoch"].to_numpy() if "epoch" in history else np.arange(1, len(history) + 1)
    return Training(history, epochs, kept_epoch(history), variational)


def check_test_set(test, scores) -> np.ndarray:
    """Validate ``test`` (see :func:`analyze`) and the scores; return scores ``(N,)``."""
    x = np.asarray(test.x)
    if x.ndim not in (3, 4) or len(x) == 0 or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise expected("test images of shape (N, H, W) or (N, H, W, C) with C in (1, 3)",
                       f"shape {x.shape}", cls=DataError)
    n = len(x)
    for what, a in (("labels y", test.y), ("classes", test.classes)):
        if np.shape(a) != (n,):
            raise expected(f"{what} of shape ({n},), one per test image",
                           f"shape {np.shape(a)}", cls=DataError)
    masks = getattr(test, "masks", None)
    if masks is not None:
        if np.shape(masks) != x.shape[:3]:
            raise expected(f"ground-truth masks of shape {x.shape[:3]}, one per test image at "
                           "its size", f"shape {np.shape(masks)}", cls=DataError)
        has_mask = getattr(test, "has_mask", None)
        if has_mask is not None and np.shape(has_mask) != (n,):
            raise expected(f"has_mask of shape ({n},), one per test image",
                           f"shape {np.shape(has_mask)}", cls=DataError)
    if scores is not None:
        scores = np.asarray(scores, np.float64)
        if scores.shape != (n,) or not np.isfinite(scores).all():
            raise expected(f"finite scores of shape ({n},), one per test image",
                           f"shape {scores.shape}", cls=DataError)
    return scores


def analyze(detector, test, scores: np.ndarray | None = None, *, evaluation=None,
            history=None, max_points: int = 2000, tsne_points: int = 300, examples: int = 6,
            seed: int = 0) -> ReportData:
    """Compute everything the report shows.

    Args:
        detector: a fitted :class:`~anomaly.detector.Detector`.
        test: labelled test images with attributes ``x`` ``(N, H, W)`` or ``(N, H, W, C)``
            float32 in [0, 1], ``y`` ``(N,)`` (1 = anomaly), ``classes`` ``(N,)``,
            ``class_names``, ``dataset`` and ``normal_classes``, and optionally ``masks``
            ``(N, H, W)`` bool and ``has_mask`` ``(N,)`` (ground truth of the MVTec AD layout)
            (:class:`anomaly.data.splits.TestSet`).
        scores: the detector's scores ``(N,)`` of ``test.x`` when the caller has them;
            computed otherwise.
        evaluation: the :class:`~anomaly.evaluation.Evaluation` of these ``scores`` when the
            caller has it (with its pixel metrics where ``test`` has masks); computed
            otherwise.
        history: per-epoch losses (a dict of lists or a DataFrame), or ``None``.
        max_points: test images in the latent scatter, k-means and score-part scatter.
        tsne_points: test images for t-SNE (0 = none); only for codes over 2 units.
        examples: images per reconstruction grid.
    """
    from anomaly.evaluation import evaluate

    scores = check_test_set(test, scores)
    x = np.asarray(test.x, np.float32)
    if scores is None:
        scores = np.asarray(detector.decision_function(x), np.float64)
    y = np.asarray(test.y).astype(int)
    classes = np.asarray(test.classes)
    normal = tuple(int(c) for c in test.normal_classes)
    names = tuple(test.class_names) if test.class_names is not None else None
    cal = detector.calibration_
    op = cal.get()
    masks = getattr(test, "masks", None)
    has_mask = getattr(test, "has_mask", None)
    if masks is not None:
        masks = np.asarray(masks, bool)
        has_mask = (np.ones(len(x), bool) if has_mask is None
                    else np.asarray(has_mask, bool))
    ev = evaluation if evaluation is not None else evaluate(scores, y, cal, classes, names)
    if masks is not None and "pixel" not in ev.metrics:
        _add_pixel_metrics(detector, x, masks, has_mask, classes, ev)
    flagged = scores > op.threshold
    rng = np.random.default_rng(seed)
    variational = bool(detector.model_.variational)
    d = int(detector.model_.code_dim)
    score_name = detector.score
    k = max(1, int(examples))
    data = ReportData(
        model=detector.model, score_name=score_name,
        error_name="squared error" if score_name.startswith("mse") else "BCE - entropy",
        code_dim=d, variational=variational, denoise=float(detector.denoise),
        dataset=str(test.dataset), normal_classes=normal, class_names=names,
        image_shape=tuple(x.shape[1:]), y=y, classes=classes, scores=scores, calibration=cal,
        evaluation=ev, ranking=ranking(y, scores, seed=seed), fpr_checks=fpr_checks(scores, y, cal),
        uniformity=uniformity(scores[y == 0], cal),
        groups={}, error_vmax=1.0, latent=None, tsne=Missing(""), kmeans_ari={},
        score_parts=Missing(""), manifold=Missing(""), interpolation=Missing(""),
        affine=Missing(""), denoising=Missing(""),
        training=_training(history, variational),
        pixel=ev.metrics.get("pixel") or Missing(NO_MASKS))

    # Reconstruction grids, drawn on one colour scale so error maps compare across grids.
    idx_n, idx_a = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    picks: dict[str, tuple[np.ndarray, str] | Missing] = {}
    none = Missing("No test images of this kind.")
    if len(idx_n):
        med = np.median(scores[idx_n])
        picks["typical_normal"] = (idx_n[np.argsort(np.abs(scores[idx_n] - med),
                                                    kind="stable")][:k],
                                   "Typical normal test images (scores nearest the normal median)")
        picks["false_positives"] = (idx_n[np.argsort(-scores[idx_n], kind="stable")][:k],
                                    f"Worst false positives: the highest-scoring normal test "
                                    f"images ({int(flagged[idx_n].sum())} of {len(idx_n)} "
                                    "flagged)")
    if len(idx_a):
        picks["top_anomalies"] = (idx_a[np.argsort(-scores[idx_a], kind="stable")][:k],
                                  "Highest-scoring anomalous test images")
        picks["false_negatives"] = (idx_a[np.argsort(scores[idx_a], kind="stable")][:k],
                                    f"Worst false negatives: the lowest-scoring anomalous test "
                                    f"images ({int((~flagged[idx_a]).sum())} of {len(idx_a)} "
                                    "missed)")
    vmax = 0.0
    for kind in ("typical_normal", "top_anomalies", "false_positives", "false_negatives"):
        if kind not in picks:
            data.groups[kind] = none
            continue
        sel, title = picks[kind]
        out = detector.detect(x[sel], reconstruction=True, error_map=True, validated=True)
        err = channels_mean(out.error_map)
        vmax = max(vmax, float(np.max(err)))
        data.groups[kind] = ImageSet(title, x[sel], out.reconstruction, err, out.scores,
                                     out.is_anomaly, [data.class_label(int(c), False)
                                                      for c in classes[sel]])
    data.error_vmax = max(vmax, 1e-12)
    data.mask_errors = (_mask_errors(detector, x, masks, has_mask, classes, y, scores, data)
                        if masks is not None else Missing(NO_MASKS))

    # Latent space on a random subset.
    sub = np.sort(rng.permutation(len(x))[:max_points])
    codes = detector.encode(x[sub])
    sub_classes = classes[sub]
    data.latent = _latent(codes, sub_classes, "means" if variational else "codes")
    data.extra["latent_points"] = len(sub)
    if d > 2 and tsne_points > 0 and len(sub) >= 5:
        t_sub = np.sort(rng.permutation(len(sub))[:tsne_points])
        pts, perplexity = _tsne(codes[t_sub], seed)
        data.tsne = Latent(pts, sub_classes[t_sub],
                           f"t-SNE (exact, perplexity {perplexity:.0f}) of the {d}-D latent "
                           f"codes of a random {len(t_sub)} of {len(sub)} test images",
                           "t-SNE 1", "t-SNE 2", "t-SNE")
        data.extra["tsne_points"] = len(t_sub)
    else:
        data.tsne = Missing("The code has at most 2 units: shown directly above." if d <= 2
                            else "t-SNE was turned off (--tsne 0).")
    normal_mask = np.isin(sub_classes, normal)
    if len(normal) >= 2 and len(np.unique(sub_classes[normal_mask])) >= 2:
        data.kmeans_ari["normal classes"] = {
            "k": len(normal), "n": int(normal_mask.sum()),
            "ari": _kmeans_ari(codes[normal_mask], sub_classes[normal_mask], len(normal), seed)}
    n_cls = len(np.unique(sub_classes))
    if n_cls >= 2 and len(sub) > n_cls:
        data.kmeans_ari["all test classes"] = {"k": n_cls, "n": len(sub),
                                               "ari": _kmeans_ari(codes, sub_classes, n_cls, seed)}
    data.score_parts = _score_parts(detector, x[sub], y[sub], op)

    # Generative pictures.
    codes_normal = codes[normal_mask] if normal_mask.sum() >= 3 else codes
    data.manifold = (_manifold(detector, codes_normal, d) if variational else Missing(
        f"{detector.model} is not a generative model (no prior over its codes): no decoded "
        "latent grid."))
    data.interpolation = _interpolation(detector, x, classes, scores, picks, sub[normal_mask])
    pool = idx_n[:POOL] if len(idx_n) else np.arange(min(POOL, len(x)))
    data.affine = _affine(detector, x[pool], scores[pool], k)
    data.denoising = _denoising(detector, x[pool], k, seed)
    data.upscaled = _upscaled(detector, x, scores, picks, data)
    return data


NO_MASKS = ("The test data has no ground-truth masks: only a data set in the MVTec AD layout "
            "(ROOT/ground_truth/<defect>/<name>_mask.png) brings them.")


def _add_pixel_metrics(detector, x, masks, has_mask, classes, ev) -> None:
    """Pixel AUROC and PRO of every test image's error map into ``ev``, as ``anomaly fit``
    measures them; for a caller that handed over no evaluation with them."""
    from anomaly.evaluation import add_pixel_metrics

    maps = np.concatenate([
        channels_mean(detector.detect(x[i:i + MAP_CHUNK], error_map=True,
                                      validated=True).error_map).astype(np.float32)
        for i in range(0, len(x), MAP_CHUNK)])
    add_pixel_metrics(ev, maps, masks, has_mask, classes)


def _mask_errors(detector, x, masks, has_mask, classes, y, scores, data) -> MaskSet | Missing:
    """The highest- and median-scored image of each defect type whose mask marks defect
    pixels (an image without a mask has no contour to draw)."""
    usable = has_mask & masks.reshape(len(masks), -1).any(axis=1) & (y == 1)
    defect_classes = [int(c) for c in np.unique(classes[usable])]
    if not defect_classes:
        return Missing("No anomalous test image has a ground-truth mask with defect pixels.")
    shown = defect_classes[:MASK_DEFECTS]
    sel, picks = [], []
    for c in shown:
        idx = np.flatnonzero(usable & (classes == c))
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        sel.append(idx[0])
        picks.append("highest")
        if len(idx) > 1:  # the median of the descending order: never the highest again
            sel.append(idx[len(idx) // 2])
            picks.append("median")
    sel = np.asarray(sel)
    out = detector.detect(x[sel], error_map=True, validated=True)
    err = channels_mean(out.error_map)
    more = (f" (the first {len(shown)} of {len(defect_classes)} defect types)"
            if len(shown) < len(defect_classes) else "")
    return MaskSet(f"Error maps over the ground-truth masks: the highest- and median-scored "
                   f"test image of each defect type{more}", x[sel], err, masks[sel],
                   out.scores, out.is_anomaly,
                   [data.class_label(int(c), False) for c in classes[sel]], picks,
                   max(float(np.max(err)), 1e-12))


def _upscaled(detector, x, scores, picks, data) -> Upscaled | Missing:
    if detector.model != "affine-vae":
        return Missing(f"Only for affine-vae models, whose coordinate decoder maps pixel "
                       f"coordinates and so decodes on a finer grid; a {detector.model} decodes "
                       "at its training size only.")
    half = DECODE_EXAMPLES // 2
    sel = [int(i) for kind in ("typical_normal", "top_anomalies") if kind in picks
           for i in picks[kind][0][:half]]
    if not sel:
        return Missing("No test images.")
    sel = np.asarray(list(dict.fromkeys(sel)))
    return Upscaled(f"affine-vae: reconstructions decoded at the training size and on a "
                    f"{DECODE_SCALE}x finer grid, with the same weights", x[sel],
                    detector.reconstruct(x[sel]), detector.reconstruct(x[sel], scale=DECODE_SCALE),
                    DECODE_SCALE, [data.class_label(int(c)) for c in data.classes[sel]],
                    scores[sel])


def _interpolation(detector, x, classes, scores, picks, normal_idx, steps: int = 9):
    pairs = []
    if "typical_normal" in picks:
        a = int(picks["typical_normal"][0][0])
        if "top_anomalies" in picks:
            pairs.append((a, int(picks["top_anomalies"][0][0]), "normal → anomaly"))
        za = detector.encode(x[[a]])[0]
        other = [i for i in normal_idx if classes[i] != classes[a]]
        cands = np.asarray(other if other else [i for i in normal_idx if i != a], dtype=int)
        if len(cands):
            far = cands[np.argmax(np.linalg.norm(detector.encode(x[cands]) - za, axis=1))]
            pairs.append((a, int(far), "normal → normal"))
    if not pairs:
        return Missing("Too few test images.")
    ts = np.linspace(0, 1, steps)
    rows, labels = [], []
    for a, b, label in pairs:
        za, zb = detector.encode(x[[a, b]])
        imgs = _decode(detector, np.array([(1 - t) * za + t * zb for t in ts]))
        if imgs.size == steps * int(np.prod(x.shape[1:])):  # a decoder may drop C = 1
            imgs = imgs.reshape((steps, *x.shape[1:]))
        rows.append(np.concatenate([x[[a]], imgs, x[[b]]]))
        labels.append(f"{label}\n(scores {scores[a]:.3g}, {scores[b]:.3g})")
    return Rows("Decoded linear interpolations between the latent means of two test images",
                rows, labels, ["first\nimage"] + [f"t={t:.2f}" for t in ts] + ["second\nimage"],
                "the two test images (outer columns) and the codes in between decoded, at "
                "weight t (0 = first, 1 = second)")


def _affine(detector, x, scores, k: int) -> Rows | Missing:
    if detector.model != "affine-vae":
        return Missing("Only for affine-vae models.")
    rec = detector.reconstruct(x)
    nrm = detector.reconstruct(x, normalize=True)
    change = np.abs(rec - nrm).reshape(len(x), -1).mean(axis=1)
    sel = np.argsort(-change, kind="stable")[:k]
    return Rows("affine-vae: reconstruction vs normalized reconstruction (decoded with the "
                "identity transform); the normal test images the transform changes most",
                [x[sel], rec[sel], nrm[sel]],
                ["original", "reconstruction", "normalized\n(transform removed)"],
                [f"score {s:.3g}" for s in scores[sel]], "normal test images")


def _denoising(detector, clean, k: int, seed: int) -> Rows | Missing:
    std = float(detector.denoise)
    if std <= 0:
        return Missing("Only for models trained with --denoise STD > 0 (this one was not): "
                       "a plain autoencoder is not expected to remove noise.")
    noisy = np.clip(clean + np.random.default_rng(seed + 7).normal(0, std, clean.shape), 0, 1
                    ).astype(np.float32)
    denoised = detector.reconstruct(noisy)
    mse_noisy = float(np.mean((noisy - clean) ** 2))
    mse_denoised = float(np.mean((denoised - clean) ** 2))
    return Rows(f"Denoising: Gaussian noise std {std:g} (as in training) added to normal test "
                f"images, then reconstructed; MSE to the clean images over {len(clean)}: noisy "
                f"{mse_noisy:.4f}, reconstructed {mse_denoised:.4f}",
                [clean[:k], noisy[:k], denoised[:k]], ["clean", "noisy input", "reconstruction"],
                [f"image {i + 1}" for i in range(min(k, len(clean)))], "normal test images",
                {"noise_std": std, "n": len(clean), "mse_noisy": mse_noisy,
                 "mse_denoised": mse_denoised})


def summary(data: ReportData) -> dict:
    """The report's numbers as a JSON-ready dict (``summary.json``, minus provenance)."""
    m = data.evaluation.metrics
    op = data.calibration.get()
    names = data.class_names
    default = next(c for c in data.fpr_checks if c.default)
    out = {
        "model": data.model,
        "score": data.score_name,
        "code_dim": data.code_dim,
        "image_shape": list(data.image_shape),
        "dataset": data.dataset,
        "normal_classes": list(data.normal_classes),
        "normal_class_names": [names[c] if names is not None and 0 <= c < len(names)
                               else str(c) for c in data.normal_classes],
        "normal_class_labels": [data.class_label(c, False) for c in data.normal_classes],
        "n_test": len(data.y),
        "n_anomalies": int(data.y.sum()),
        "auroc": m["auroc"],
        "average_precision": m["average_precision"],
        "operating_point": op.name,
        "threshold": op.threshold,
        "expected_fpr": op.expected_fpr,
        "measured_fpr": default.measured_fpr,
        "recall": m["operating_points"][op.name]["recall"],
        "operating_points": m["operating_points"],
        "fpr_checks": {c.name: {"expected_fpr": c.expected_fpr, "expected_ci": c.expected_ci,
                                "n_val": c.n_val, "measured_fpr": c.measured_fpr,
                                "measured_ci": c.measured_ci, "n_normal_test": c.n_normal,
                                "agrees": c.agrees} for c in data.fpr_checks},
        "latent_projection": data.latent.projection,
        "kmeans_ari": data.kmeans_ari,
        **data.extra,
    }
    r = data.ranking
    if isinstance(r, Ranking):
        out.update({"auroc_ci95": list(r.auroc_ci), "auroc_bootstrap": r.n_bootstrap,
                    "partial_auroc": r.partial_auroc, "partial_auroc_max_fpr": r.partial_max_fpr,
                    "average_precision_normal": r.average_precision_normal})
    u = data.uniformity
    if isinstance(u, Uniformity):
        out["normalized_uniformity"] = {"ks_statistic": u.ks_statistic, "ks_pvalue": u.ks_pvalue,
                                        "ks2_pvalue": u.ks2_pvalue, "n": len(u.normalized),
                                        "n_reference": u.n_reference}
    if isinstance(data.training, Training):
        out["kept_epoch"] = data.training.kept_epoch
    if isinstance(data.denoising, Rows):
        out["denoise"] = data.denoising.numbers
    if isinstance(data.pixel, dict):
        out["pixel"] = data.pixel
        out["per_defect"] = defect_rows(data)
    return out


def _number(v) -> float | None:
    """A table cell as a float, ``None`` where pandas holds a missing value as NaN."""
    return None if v is None or pd.isna(v) else float(v)


def defect_rows(data: ReportData) -> list[dict]:
    """One row per anomaly class (defect type) of the per-class table: ``n``, how many of its
    images the default operating point flags and their share, and its ``pixel_auroc`` and
    ``pro`` (its images with the normal ones; ``None`` where undefined)."""
    op = data.calibration.default
    df = data.evaluation.per_class
    rows = []
    for _, r in df[df["role"] == "anomaly"].iterrows():
        rate = float(r[f"flagged@{op}"])
        rows.append({"class": int(r["class"]), "name": str(r["name"]), "n": int(r["n"]),
                     "detected": round(rate * int(r["n"])), "detection_rate": rate,
                     "pixel_auroc": _number(r.get("pixel_auroc")),
                     "pro": _number(r.get("pro"))})
    return rows
