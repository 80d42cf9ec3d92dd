"""Evaluation reports: what the model sees, as PNG figures and one self-contained HTML page.

``anomaly report ARTIFACT`` (and ``anomaly fit``, unless ``--no-report``) writes a folder::

    report.html           every figure embedded as a base64 data: URI; opens offline, no
                          external file, script, stylesheet or font
    summary.json          the numbers of the summary (AUROC, thresholds, FPRs, ARI, ...)
    per_class.csv         the per-class detection table
    *.png                 the figures, as in the page (see FIGURES)

**Where it goes.** By default ``MODELS/_reports/NAME/VERSION/`` for the artifact
``MODELS/NAME/VERSION`` (``--output DIR`` to choose). Not inside the artifact, whose manifest
forbids unlisted files, and not beside it in ``MODELS/NAME/``, where the service and
``anomaly models`` would take a folder for a model version: the service skips top-level folders
of the models directory whose names start with ``_``, and the report has no manifest.

**Test images** come from the artifact's data set: when the artifact holds the ``config.yaml``
of the run that made it, the very test split ``anomaly fit`` evaluated on
(:func:`anomaly.pipeline.prepare`); otherwise (or with ``--dataset``/``--test-data``) the test
part of :func:`anomaly.pipeline.load_data`, labelled by the artifact's normal classes. Every
test image is scored for the curves and tables; the pictures use at most ``max_points`` of them
(latent scatter, k-means) and ``tsne_points`` for t-SNE, so a report takes seconds.

All plotting uses matplotlib's object API on the Agg canvas (no pyplot, no global state, no
display). Scores: higher = more anomalous; an image is flagged when ``score > threshold``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import inspect
import io
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from anomaly.errors import DataError, expected
from anomaly.pipeline import load_test_set

REPORTS_DIR = "_reports"
#: File name -> section title of every figure a report can hold. Figures that do not apply
#: to a model are left out (and the page says why): ``manifold.png`` needs a variational
#: model, ``affine.png`` an ``affine-vae``, ``latent_tsne.png`` a code of more than 2 units,
#: ``training.png`` a ``history.csv``, ``roc_pr.png`` both normal and anomalous test images.
FIGURES = {
    "roc_pr.png": "ROC and precision-recall curves",
    "score_histogram.png": "Score distributions",
    "per_class.png": "Detection rate per class",
    "confusion_matrix.png": "Confusion matrix",
    "recon_typical_normal.png": "Reconstructions: typical normal images",
    "recon_top_anomalies.png": "Reconstructions: highest-scoring anomalies",
    "recon_false_positives.png": "Reconstructions: worst false positives",
    "recon_false_negatives.png": "Reconstructions: worst false negatives",
    "latent.png": "Latent space",
    "latent_tsne.png": "Latent space (t-SNE)",
    "manifold.png": "Decoded latent grid (manifold)",
    "interpolation.png": "Latent interpolations",
    "affine.png": "Normalized reconstructions (affine transform removed)",
    "denoise.png": "Denoising",
    "training.png": "Training curves",
}
_DPI = 100
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_report_dir(artifact: str | Path) -> Path:
    """``MODELS/_reports/NAME/VERSION`` for the artifact ``MODELS/NAME/VERSION``."""
    path = Path(artifact).resolve()
    return path.parent.parent / REPORTS_DIR / path.parent.name / path.name


# -- data ---------------------------------------------------------------------------------------


# -- figures ------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _wrap(text: str, fig, fontsize: float = 10) -> str:
    """Break a title into lines that fit the figure's width."""
    width = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))
    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _class_label(c: int, names: tuple[str, ...] | None, normal: tuple[int, ...]) -> str:
    name = names[c] if names is not None and 0 <= c < len(names) else str(c)
    label = f"{c}: {name}" if name != str(c) else str(c)
    return f"{label} ({'normal' if c in normal else 'anomaly'})"


def _fig_roc_pr(scores, y, ev):
    from sklearn.metrics import precision_recall_curve, roc_curve

    m = ev.metrics
    fig = _figure(11, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(y, scores)
    ax1.plot(fpr, tpr, color=_COLORS[0], lw=2, label=f"ROC (AUROC {m['auroc']:.4f})")
    ax1.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    precision, recall, _ = precision_recall_curve(y, scores)
    ax2.plot(recall, precision, color=_COLORS[0], lw=2,
             label=f"PR (AP {m['average_precision']:.4f})")
    prevalence = float(np.mean(y))
    ax2.axhline(prevalence, ls="--", color="grey", lw=1,
                label=f"chance (prevalence {prevalence:.3f})")
    for i, (name, p) in enumerate(m["operating_points"].items()):
        color = _COLORS[(i + 1) % len(_COLORS)]
        star = " (default)" if name == m["default_operating_point"] else ""
        ax1.plot(p["fpr"], p["recall"], "o", ms=9, color=color, mec="black",
                 label=f"{name}{star}: FPR {p['fpr']:.3f}, TPR {p['recall']:.3f}")
        ax2.plot(p["recall"], p["precision"], "o", ms=9, color=color, mec="black",
                 label=f"{name}{star}: recall {p['recall']:.3f}, precision {p['precision']:.3f}")
    ax1.set(title="ROC curve (test set)", xlabel="false-positive rate (normal images flagged)",
            ylabel="true-positive rate (anomalies flagged)", xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01))
    ax2.set(title="Precision-recall curve (test set)", xlabel="recall (anomalies flagged)",
            ylabel="precision (flagged images that are anomalies)", xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01))
    ax1.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="lower left", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    return fig


def _fig_histogram(scores, y, calibration, score_name: str):
    fig = _figure(10, 4.4)
    ax = fig.subplots()
    thresholds = [op.threshold for op in calibration.operating_points.values()]
    lo = float(min(scores.min(), *thresholds))
    hi = float(max(np.quantile(scores, 0.995), *thresholds))
    hi = hi if hi > lo else lo + 1.0
    bins = np.linspace(lo, hi + 0.02 * (hi - lo), 60)
    clipped = np.clip(scores, bins[0], bins[-1])
    n_clip = int(np.sum(scores > bins[-1]))
    for label, mask, color in (("normal test images", y == 0, _COLORS[0]),
                               ("anomalous test images", y == 1, _COLORS[1])):
        if mask.any():
            ax.hist(clipped[mask], bins=bins, density=True, alpha=0.55, color=color,
                    label=f"{label} ({int(mask.sum())})")
    ref = np.clip(calibration.reference_scores, bins[0], bins[-1])
    ax.hist(ref, bins=bins, density=True, histtype="step", lw=1.5, color="black",
            label=f"normal validation images, calibration ({len(ref)})")
    styles = ("-", "--", ":", "-.")
    for i, (name, op) in enumerate(calibration.operating_points.items()):
        star = " (default)" if name == calibration.default else ""
        ax.axvline(op.threshold, color=_COLORS[(i + 2) % len(_COLORS)], lw=2,
                   ls=styles[i % len(styles)], label=f"threshold {name}{star} = {op.threshold:.4g}")
    note = f"; {n_clip} scores above {bins[-1]:.3g} in the last bin" if n_clip else ""
    ax.set(title=_wrap(f"Anomaly scores of normal vs anomalous test images{note}", fig, 12),
           xlabel=f"anomaly score ({score_name}; higher = more anomalous)", ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _fig_per_class(ev, normal):
    df = ev.per_class
    ops_ = list(ev.metrics["operating_points"])
    fig = _figure(min(16, max(7, 0.9 * len(df) * max(1, len(ops_)) + 3)), 4.6)
    ax = fig.subplots()
    x = np.arange(len(df))
    width = 0.8 / len(ops_)
    for i, op in enumerate(ops_):
        star = " (default)" if op == ev.metrics["default_operating_point"] else ""
        bars = ax.bar(x + (i - (len(ops_) - 1) / 2) * width, df[f"flagged@{op}"], width,
                      color=_COLORS[i % len(_COLORS)], label=f"flagged at {op}{star}")
        for bar, role in zip(bars, df["role"], strict=True):
            if role == "normal":
                bar.set_hatch("//")
                bar.set_edgecolor("black")
    ax.set_xticks(x, [f"{r['name']}\n({r['role']}, n={r['n']})" for _, r in df.iterrows()],
                  fontsize=8)
    ax.set(title="Fraction of each test class flagged\n(detection rate of anomaly classes; "
           "false-alarm rate of normal classes, hatched)", xlabel="test class",
           ylabel="fraction of the class flagged", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fig_confusion(ev):
    m = ev.metrics
    name = m["default_operating_point"]
    p = m["operating_points"][name]
    cm = np.array([[p["tn"], p["fp"]], [p["fn"], p["tp"]]])
    rows = cm.sum(axis=1, keepdims=True)
    frac = cm / np.maximum(rows, 1)
    fig = _figure(5.6, 4.6)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]}\n({frac[i, j]:.1%} of row)", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=11)
    ax.set_xticks([0, 1], ["normal", "anomaly"])
    ax.set_yticks([0, 1], ["normal", "anomaly"])
    ax.set(title=f"Confusion matrix at {name} (threshold {p['threshold']:.4g})",
           xlabel="predicted (score > threshold = anomaly)", ylabel="true label")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    return fig


def _mosaic(images, pad: int = 3, fill: float = 1.0) -> np.ndarray:
    """Images ``(k, 28, 28)`` side by side with ``pad`` pixels of ``fill`` between them."""
    k = len(images)
    out = np.full((28, k * 28 + (k - 1) * pad), fill, dtype=np.float32)
    for j, img in enumerate(images):
        out[:, j * (28 + pad) : j * (28 + pad) + 28] = img
    return out


def _centers(k: int, pad: int = 3) -> np.ndarray:
    return np.arange(k) * (28 + pad) + 13.5


def _image_rows(fig, rows, row_labels, col_labels, *, cmaps=None, vmaxs=None,
                col_colors=None):
    """One axes per row, each showing its images side by side (fast to lay out and draw);
    column labels under the first row's images. Returns the axes and the last image."""
    k = len(rows[0])
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    ims = []
    for i, (ax, row) in enumerate(zip(axes, rows, strict=True)):
        cmap = (cmaps or {}).get(i, "gray")
        vmax = (vmaxs or {}).get(i, 1.0)
        fill = vmax if cmap == "gray" else 0.0
        ims.append(ax.imshow(_mosaic(row, fill=fill), cmap=cmap, vmin=0, vmax=vmax,
                             interpolation="nearest"))
        ax.set_yticks([])
        ax.set_ylabel(row_labels[i], fontsize=9)
        ax.set_xticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
    axes[0].xaxis.tick_top()
    axes[0].set_xticks(_centers(k), col_labels, fontsize=7)
    axes[0].tick_params(axis="x", length=0)
    if col_colors is not None:
        for lbl, color in zip(axes[0].get_xticklabels(), col_colors, strict=True):
            lbl.set_color(color)
    return axes, ims


def _fig_recon_grid(title, xs, recons, errs, scores, flagged, labels, err_name, threshold):
    k = len(xs)
    fig = _figure(max(6.5, 1.25 * k + 2.2), 5.4)
    vmax = float(max(np.max(errs), 1e-12))
    cols = [f"{labels[j]}\nscore {scores[j]:.4g}\n{'flagged' if flagged[j] else 'not flagged'}"
            for j in range(k)]
    colors = ["#c00000" if f else "#006000" for f in flagged]
    axes, ims = _image_rows(fig, [xs, recons, errs], ["original", "reconstruction", "error map"],
                            cols, cmaps={2: "inferno"}, vmaxs={2: vmax}, col_colors=colors)
    fig.colorbar(ims[2], ax=axes[2], label=f"per-pixel {err_name}", shrink=0.9, pad=0.01)
    fig.suptitle(_wrap(f"{title}\n(threshold {threshold:.4g}; red = flagged as anomalous)", fig),
                 fontsize=10)
    fig.supxlabel("test images (columns), each with its reconstruction and error map",
                  fontsize=9)
    return fig


def _scatter_by_class(ax, pts, classes, names, normal):
    for i, c in enumerate(np.unique(classes)):
        mask = classes == c
        marker = "o" if int(c) in normal else "x"
        ax.scatter(pts[mask, 0], pts[mask, 1], s=12, alpha=0.7, marker=marker,
                   color=_COLORS[i % len(_COLORS)],
                   label=_class_label(int(c), names, normal))
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.grid(alpha=0.3)


def _fig_latent(codes, classes, names, normal, what: str):
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    d = codes.shape[1]
    if d == 1:
        pts = np.c_[codes[:, 0], classes + np.random.default_rng(0).uniform(-0.2, 0.2,
                                                                             len(codes))]
        title, xl, yl = f"Latent means of {len(codes)} test images (1-D code)", "z[0]", \
            "class (jittered)"
        projection = "none (1-D code)"
    elif d == 2:
        pts = codes
        title, xl, yl = f"Latent {what} of {len(codes)} test images (2-D code, shown " \
            "directly)", "z[0]", "z[1]"
        projection = "none (2-D code)"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=0)
        pts = pca.fit_transform(codes)
        var = pca.explained_variance_ratio_
        title = (f"PCA projection of the {d}-D latent {what} of {len(codes)} test images "
                 f"({var.sum():.0%} of the variance)")
        xl, yl = f"PC1 ({var[0]:.0%})", f"PC2 ({var[1]:.0%})"
        projection = f"PCA ({var.sum():.0%} of the variance)"
    _scatter_by_class(ax, pts, classes, names, normal)
    ax.set(title=_wrap(title, fig), xlabel=xl, ylabel=yl)
    ax.title.set_fontsize(10)
    return fig, projection


def _tsne(codes: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.manifold import TSNE

    n = len(codes)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    iters = {"max_iter": 500} if "max_iter" in inspect.signature(TSNE).parameters \
        else {"n_iter": 500}
    # The exact gradient is faster than Barnes-Hut for the few hundred points used here.
    tsne = TSNE(2, perplexity=perplexity, init="pca", method="exact", random_state=seed,
                **iters)
    return tsne.fit_transform(codes.astype(np.float64)), perplexity


def _fig_tsne(pts, classes, names, normal, n_total, perplexity, d):
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    _scatter_by_class(ax, pts, classes, names, normal)
    title = (f"t-SNE (exact, perplexity {perplexity:.0f}) of the {d}-D latent codes of a "
             f"random {len(pts)} of {n_total} test images")
    ax.set(title=_wrap(title, fig), xlabel="t-SNE 1", ylabel="t-SNE 2")
    ax.title.set_fontsize(10)
    return fig


def _decode(detector, z: np.ndarray, normalize: bool = False) -> np.ndarray:
    from keras import ops

    logits = detector.model_.decode_logits(np.asarray(z, np.float32), normalize)
    return ops.convert_to_numpy(ops.sigmoid(logits))


def _manifold_codes(codes_normal: np.ndarray, d: int, n: int):
    """Codes on a grid of standard normal quantiles 0.05..0.95: on the axes of a 1-/2-D code,
    else along the top two principal directions of the normal test codes (in their std)."""
    q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, n)])
    if d == 1:
        return q[:, None], q, None, "z[0] (standard normal quantiles 0.05..0.95)", None
    if d == 2:
        zz = np.array([[a, b] for b in q[::-1] for a in q])
        return zz, q, q[::-1], "z[0] (standard normal quantiles)", "z[1] (standard normal " \
            "quantiles)"
    mean = codes_normal.mean(axis=0)
    _, s, vt = np.linalg.svd(codes_normal - mean, full_matrices=False)
    std = s[:2] / np.sqrt(max(len(codes_normal) - 1, 1))
    zz = np.array([mean + a * std[0] * vt[0] + b * std[1] * vt[1] for b in q[::-1] for a in q])
    return zz, q, q[::-1], "PC1 of the normal codes (in its std, normal quantiles)", \
        "PC2 of the normal codes (in its std, normal quantiles)"


def _fig_manifold(detector, codes_normal, d):
    n = 12 if d <= 2 else 10
    zz, qx, qy, xl, yl = _manifold_codes(codes_normal, d, n)
    imgs = _decode(detector, zz)
    rows = 1 if qy is None else n
    mosaic = imgs.reshape(rows, n, 28, 28).transpose(0, 2, 1, 3).reshape(rows * 28, n * 28)
    fig = _figure(7.6, 7.2 if rows > 1 else 2.2)
    ax = fig.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks(np.arange(n) * 28 + 13.5, [f"{v:.2f}" for v in qx], fontsize=7)
    if qy is not None:
        ax.set_yticks(np.arange(n) * 28 + 13.5, [f"{v:.2f}" for v in qy], fontsize=7)
    else:
        ax.set_yticks([])
    how = "over the latent axes" if d <= 2 else "along the top 2 principal directions"
    ax.set(title=_wrap(f"Images decoded on a {n}x{rows} grid of latent values {how} "
                       f"({d}-D code)", fig), xlabel=xl, ylabel=yl or "")
    ax.title.set_fontsize(10)
    return fig


def _fig_interpolation(detector, pairs, x, steps=9):
    ts = np.linspace(0, 1, steps)
    fig = _figure(1.05 * (steps + 2) + 1.6, 1.75 * len(pairs) + 1.2)
    rows, labels = [], []
    for a, b, label in pairs:
        za, zb = detector.encode(x[[a, b]])
        imgs = _decode(detector, np.array([(1 - t) * za + t * zb for t in ts]))
        s_ab = detector.score(x[[a, b]])
        rows.append(np.concatenate([x[[a]], imgs, x[[b]]]))
        labels.append(f"{label}\n(scores {s_ab[0]:.3g}, {s_ab[1]:.3g})")
    cols = ["first\nimage"] + [f"t={t:.2f}" for t in ts] + ["second\nimage"]
    _image_rows(fig, rows, labels, cols)
    fig.suptitle("Decoded linear interpolations between the latent means of two test images",
                 fontsize=10)
    fig.supxlabel("the two test images (outer columns) and the codes in between decoded, at "
                  "weight t (0 = first, 1 = second)", fontsize=9)
    return fig


def _fig_rows(title, rows, row_labels, col_titles, xlabel):
    k = len(rows[0])
    fig = _figure(max(6.5, 1.25 * k + 2.0), 1.45 * len(rows) + 1.3)
    _image_rows(fig, rows, row_labels, col_titles)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    fig.supxlabel(xlabel, fontsize=9)
    return fig


def _fig_training(hist: pd.DataFrame, variational: bool):
    from matplotlib.ticker import MaxNLocator

    epochs = hist["epoch"].to_numpy() if "epoch" in hist else np.arange(1, len(hist) + 1)
    panels = [("Total loss", (("loss", "training"), ("val_loss", "validation")))]
    if variational and "kl_loss" in hist:
        panels += [("Reconstruction term", (("reconstruction_loss", "training"),
                                            ("val_reconstruction_loss", "validation"))),
                   ("KL term", (("kl_loss", "training"), ("val_kl_loss", "validation")))]
    fig = _figure(4.6 * len(panels) + 0.6, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for i, (col, label) in enumerate(series):
            if col in hist and hist[col].notna().any():
                ax.plot(epochs, hist[col], marker="o", ms=4, color=_COLORS[i], label=label)
        ax.set(title=title, xlabel="epoch", ylabel="loss per image (nats)" if title !=
               "Total loss" else "loss per image")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves (normal training and validation images)", fontsize=11)
    return fig


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    """A written report: its folder, page, figures and summary numbers."""

    path: Path
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _pick(order: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(order[:k], dtype=int)


def _kmeans_ari(codes, classes, k, seed):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(codes)
    return float(adjusted_rand_score(classes, pred))


def check_report_dir(out_dir: Path) -> Path:
    """Refuse to replace anything but an earlier report (a folder holding ``summary.json`` and
    ``report.html``): the report is written atomically by swapping the whole folder."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not ((out_dir / "summary.json").is_file()
                                            and (out_dir / "report.html").is_file()))):
        raise expected("an --output folder that is new, empty or an earlier report",
                       f"{out_dir} (holds other files)",
                       hint="Pick another folder: the report replaces its --output folder.",
                       cls=DataError)
    return out_dir


def build_report(artifact: str | Path, output: str | Path | None = None, *, detector=None,
                 dataset: str | None = None, test_data: str | None = None,
                 cache_dir: str | None = None, test_limit: int | None = None,
                 max_points: int = 2000, tsne_points: int = 300, examples: int = 6,
                 seed: int = 0) -> Report:
    """Write the report of an artifact (see the module docstring).

    Args:
        artifact: the artifact directory.
        output: the report folder; default :func:`default_report_dir`. Replaced if it exists.
        detector: the artifact's fitted :class:`~anomaly.detector.Detector`, when already in
            memory (``anomaly fit``); loaded from ``artifact`` otherwise.
        dataset, test_data, cache_dir, test_limit: test images other than the artifact's own
            test split (see :func:`load_test_set`); ``test_limit`` caps their number.
        max_points: test images used for the latent scatter and k-means (a random subset).
        tsne_points: test images for t-SNE (0 = no t-SNE); only for codes of more than 2 units.
        examples: images per reconstruction grid.
    """
    from anomaly.artifact import read_info
    from anomaly.detector import Detector
    from anomaly.evaluation import evaluate
    from anomaly.utils import atomic_dir

    artifact = Path(artifact)
    info = read_info(artifact)
    meta = info.metadata
    det = detector if detector is not None else Detector.load(artifact)
    out_dir = check_report_dir(Path(output) if output is not None
                               else default_report_dir(artifact))
    data = load_test_set(artifact, meta, dataset=dataset, test_data=test_data,
                         cache_dir=cache_dir, test_limit=test_limit, seed=det.seed)
    normal = data.normal_classes
    names = data.class_names
    cal = det.calibration_
    scores = det.score(data.x)
    y = data.y
    ev = evaluate(scores, y, cal, data.classes, names)
    m = ev.metrics
    op = cal.get()
    flagged = scores > op.threshold
    rng = np.random.default_rng(seed)
    variational = bool(det.model_.variational)
    d = int(det.model_.code_dim)
    score_name = det.resolved_score
    err_name = "squared error" if score_name.startswith("mse") else "BCE - entropy"
    k = max(1, int(examples))

    figs: dict[str, bytes] = {}
    notes: dict[str, str] = {}
    extra: dict = {}

    def add(name: str, fig) -> None:
        figs[name] = _png(fig)

    both = m["auroc"] is not None
    if both:
        add("roc_pr.png", _fig_roc_pr(scores, y, ev))
    else:
        notes["roc_pr.png"] = "The test images are all normal or all anomalous: no curves."
    add("score_histogram.png", _fig_histogram(scores, y, cal, score_name))
    add("per_class.png", _fig_per_class(ev, normal))
    add("confusion_matrix.png", _fig_confusion(ev))

    # Reconstruction grids.
    idx_n, idx_a = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    groups = {}
    if len(idx_n):
        med = np.median(scores[idx_n])
        groups["recon_typical_normal.png"] = (
            _pick(idx_n[np.argsort(np.abs(scores[idx_n] - med), kind="stable")], k),
            "Typical normal test images (scores nearest the normal median)")
        groups["recon_false_positives.png"] = (
            _pick(idx_n[np.argsort(-scores[idx_n], kind="stable")], k),
            f"Worst false positives: the highest-scoring normal test images "
            f"({int(flagged[idx_n].sum())} of {len(idx_n)} flagged)")
    if len(idx_a):
        groups["recon_top_anomalies.png"] = (
            _pick(idx_a[np.argsort(-scores[idx_a], kind="stable")], k),
            "Highest-scoring anomalous test images")
        groups["recon_false_negatives.png"] = (
            _pick(idx_a[np.argsort(scores[idx_a], kind="stable")], k),
            f"Worst false negatives: the lowest-scoring anomalous test images "
            f"({int((~flagged[idx_a]).sum())} of {len(idx_a)} missed)")
    for fname in ("recon_typical_normal.png", "recon_top_anomalies.png",
                  "recon_false_positives.png", "recon_false_negatives.png"):
        if fname not in groups:
            notes[fname] = "No test images of this kind."
            continue
        sel, title = groups[fname]
        out = det.detect(data.x[sel], reconstruction=True, error_map=True, validated=True)
        labels = [_class_label(int(c), names, normal).split(" (")[0] for c in data.classes[sel]]
        add(fname, _fig_recon_grid(title, data.x[sel], out.reconstruction, out.error_map,
                                   out.scores, out.is_anomaly, labels, err_name, op.threshold))

    # Latent space on a random subset.
    sub = np.sort(rng.permutation(len(data.x))[:max_points])
    codes = det.encode(data.x[sub])
    sub_classes = data.classes[sub]
    what = "means" if variational else "codes"
    fig, projection = _fig_latent(codes, sub_classes, names, normal, what)
    add("latent.png", fig)
    extra["latent_projection"] = projection
    extra["latent_points"] = len(sub)
    if d > 2 and tsne_points > 0 and len(sub) >= 5:
        t_sub = np.sort(rng.permutation(len(sub))[:tsne_points])
        pts, perplexity = _tsne(codes[t_sub], seed)
        add("latent_tsne.png", _fig_tsne(pts, sub_classes[t_sub], names, normal, len(sub),
                                         perplexity, d))
        extra["tsne_points"] = len(t_sub)
    else:
        notes["latent_tsne.png"] = ("The code has at most 2 units: shown directly above."
                                    if d <= 2 else "t-SNE was turned off (--tsne 0).")
    # k-means on the codes: does the code separate the classes?
    ari = {}
    normal_mask = np.isin(sub_classes, normal)
    if len(normal) >= 2 and len(np.unique(sub_classes[normal_mask])) >= 2:
        ari["normal classes"] = {"k": len(normal), "n": int(normal_mask.sum()),
                                 "ari": _kmeans_ari(codes[normal_mask], sub_classes[normal_mask],
                                                    len(normal), seed)}
    n_cls = len(np.unique(sub_classes))
    if n_cls >= 2 and len(sub) > n_cls:
        ari["all test classes"] = {"k": n_cls, "n": len(sub),
                                   "ari": _kmeans_ari(codes, sub_classes, n_cls, seed)}
    extra["kmeans_ari"] = ari

    # Generative pictures.
    codes_normal = codes[normal_mask] if normal_mask.sum() >= 3 else codes
    if variational:
        add("manifold.png", _fig_manifold(det, codes_normal, d))
    else:
        notes["manifold.png"] = (f"{det.model} is not a generative model (no prior over its "
                                 "codes): no decoded latent grid.")
    pairs = []
    if "recon_typical_normal.png" in groups:
        a = int(groups["recon_typical_normal.png"][0][0])
        if "recon_top_anomalies.png" in groups:
            pairs.append((a, int(groups["recon_top_anomalies.png"][0][0]), "normal → anomaly"))
        normal_idx = sub[normal_mask]
        za = det.encode(data.x[[a]])[0]
        other = [i for i in normal_idx if data.classes[i] != data.classes[a]]
        cands = np.asarray(other if other else [i for i in normal_idx if i != a], dtype=int)
        if len(cands):
            far = cands[np.argmax(np.linalg.norm(det.encode(data.x[cands]) - za, axis=1))]
            pairs.append((a, int(far), "normal → normal"))
    if pairs:
        add("interpolation.png", _fig_interpolation(det, pairs, data.x))
    else:
        notes["interpolation.png"] = "Too few test images."
    pool = idx_n[:200] if len(idx_n) else np.arange(min(200, len(data.x)))
    if det.model == "affine-vae":
        rec = det.reconstruct(data.x[pool])
        nrm = det.reconstruct(data.x[pool], normalize=True)
        sel = np.argsort(-np.abs(rec - nrm).mean(axis=(1, 2)), kind="stable")[:k]
        add("affine.png", _fig_rows(
            "affine-vae: reconstruction vs normalized reconstruction (decoded with the identity "
            "transform); the normal test images the transform changes most",
            [data.x[pool][sel], rec[sel], nrm[sel]],
            ["original", "reconstruction", "normalized\n(transform removed)"],
            [f"score {s:.3g}" for s in scores[pool][sel]], "normal test images"))
    else:
        notes["affine.png"] = "Only for affine-vae models."
    std = float(det.denoise) if det.denoise > 0 else 0.3
    clean = data.x[pool]
    noisy = np.clip(clean + np.random.default_rng(seed + 7).normal(0, std, clean.shape), 0, 1
                    ).astype(np.float32)
    denoised = det.reconstruct(noisy)
    mse_noisy = float(np.mean((noisy - clean) ** 2))
    mse_denoised = float(np.mean((denoised - clean) ** 2))
    extra["denoise"] = {"noise_std": std, "trained_with_denoise": float(det.denoise),
                        "n": len(pool), "mse_noisy": mse_noisy, "mse_denoised": mse_denoised}
    trained = (f"trained with --denoise {det.denoise:g}" if det.denoise > 0
               else "not trained with --denoise")
    add("denoise.png", _fig_rows(
        f"Denoising: Gaussian noise std {std:g} added to normal test images, then reconstructed "
        f"(model {trained}); MSE to the clean images over {len(pool)}: noisy {mse_noisy:.4f}, "
        f"reconstructed {mse_denoised:.4f}",
        [clean[:k], noisy[:k], denoised[:k]], ["clean", "noisy input", "reconstruction"],
        [f"image {i + 1}" for i in range(min(k, len(pool)))], "normal test images"))

    hist_path = artifact / "history.csv"
    if hist_path.is_file():
        add("training.png", _fig_training(pd.read_csv(hist_path), variational))
    else:
        notes["training.png"] = "The artifact has no history.csv."

    measured_fpr = float(np.mean(flagged[y == 0])) if (y == 0).any() else None
    summary = {
        "artifact": str(artifact.resolve()),
        "artifact_sha256": info.sha256,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "model": det.model,
        "hyperparameters": det.get_params(),
        "code_dim": d,
        "dataset": data.dataset,
        "normal_classes": list(normal),
        "normal_class_names": [names[c] if names and c < len(names) else str(c)
                               for c in normal],
        "n_test": len(y),
        "n_anomalies": int(y.sum()),
        "auroc": m["auroc"],
        "average_precision": m["average_precision"],
        "operating_point": op.name,
        "threshold": op.threshold,
        "expected_fpr": op.expected_fpr,
        "measured_fpr": measured_fpr,
        "recall": m["operating_points"][op.name]["recall"],
        "operating_points": m["operating_points"],
        **extra,
        "figures": sorted(figs),
    }
    page = _html(summary, ev, figs, notes, meta)
    with atomic_dir(out_dir) as tmp:
        for fname, data_png in figs.items():
            (tmp / fname).write_bytes(data_png)
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable)
                                          + "\n")
        ev.per_class.to_csv(tmp / "per_class.csv", index=False)
    return Report(out_dir, out_dir / "report.html", {f: out_dir / f for f in figs}, summary,
                  notes)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:2px solid #dde;
padding-bottom:4px}
.sub{color:#555;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0 16px;background:#fff}
th,td{border:1px solid #d5d8de;padding:4px 10px;text-align:right;font-size:.9rem}
th{background:#eef0f4}td.l,th.l{text-align:left}
figure{margin:12px 0;background:#fff;border:1px solid #dde;padding:8px;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#444;font-size:.9rem;margin-top:6px}
.note{color:#666;font-style:italic}
nav ol{columns:2;font-size:.92rem}
.kpi{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.kpi div{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 14px}
.kpi b{display:block;font-size:1.3rem}
"""

_CAPTIONS = {
    "roc_pr.png": "Every operating point of the calibration is marked where it lands on the "
                  "test set.",
    "score_histogram.png": "Densities of the test scores; the black outline is the normal "
                           "validation (calibration) images; one vertical line per operating "
                           "point threshold.",
    "per_class.png": "Fraction of each test class flagged at each operating point.",
    "confusion_matrix.png": "At the default operating point.",
    "latent.png": "Latent means (VAEs) or codes (autoencoders) of test images, coloured by "
                  "class; circles are normal classes, crosses anomaly classes.",
    "latent_tsne.png": "t-SNE is run on a small random subset: it is slow and only its local "
                       "neighbourhoods are meaningful, not distances between clusters.",
    "manifold.png": "What the decoder makes of codes it was not given: standard normal "
                    "quantiles 0.05..0.95, as in the VAE tutorials.",
    "interpolation.png": "Rows: a typical normal image to the highest-scoring anomaly, and to "
                         "the farthest normal image (of another normal class when there is "
                         "one).",
    "affine.png": "The affine units (rotation, shear, scale, shift) are set to the identity "
                  "in the normalized reconstruction: slanted images come out straightened.",
    "denoise.png": "A model trained with --denoise learned to remove such noise.",
    "training.png": "Per-epoch losses from the artifact's history.csv; the weights of the "
                    "epoch with the lowest validation loss were kept.",
}


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return html.escape(str(v))


def _pct(v, percent: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if percent else f"{v:.4f}"


def _img(fname: str, data_png: bytes, alt: str) -> str:
    b64 = base64.b64encode(data_png).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _html(s: dict, ev, figs: dict[str, bytes], notes: dict[str, str], meta: dict) -> str:
    e = html.escape
    m = ev.metrics
    hp = s["hyperparameters"]
    classes = ", ".join(f"{c} ({n})" if n != str(c) else str(c)
                        for c, n in zip(s["normal_classes"], s["normal_class_names"],
                                        strict=True))
    fpr_ok = ""
    if s["measured_fpr"] is not None:
        fpr_ok = (f"expected FPR {s['expected_fpr']:.2%} (normal validation images) vs "
                  f"measured {s['measured_fpr']:.2%} (normal test images)")
    auroc = "undefined" if s["auroc"] is None else f"{s['auroc']:.4f}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Report: {e(str(s['name']))} {e(str(s['version']))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Anomaly detector report: {e(str(s['name']))}</h1>",
        f'<p class="sub">version {e(str(s["version"]))} · generated {e(s["generated_at"])} · '
        f"artifact SHA-256 <code>{e(s['artifact_sha256'][:16])}…</code></p>",
        "<h2 id='summary'>Summary</h2>",
        f"<p>A <b>{e(s['model'])}</b> (code of {s['code_dim']} units, score "
        f"<b>{e(hp['score'])}</b>, aggregation {e(hp['aggregation'])}) trained on the normal "
        f"class(es) <b>{e(classes)}</b> of <b>{e(s['dataset'])}</b>"
        f" ({meta.get('n_train', '?')} training, {meta.get('n_val', '?')} validation images, "
        f"{meta.get('epochs_run', '?')} epochs), evaluated on {s['n_test']} test images of which "
        f"{s['n_anomalies']} are anomalies. AUROC <b>{auroc}</b>. At the default operating "
        f"point <b>{e(s['operating_point'])}</b> (anomalous when score &gt; "
        f"{_fmt(s['threshold'], 6)}): {e(fpr_ok)}, recall {s['recall']:.2%}.</p>",
        '<div class="kpi">',
        f"<div>AUROC<b>{auroc}</b></div>",
        f"<div>average precision<b>{_pct(s['average_precision'], False)}</b></div>",
        f"<div>threshold ({e(s['operating_point'])})<b>{_fmt(s['threshold'], 6)}</b></div>",
        f"<div>expected FPR<b>{_pct(s['expected_fpr'])}</b></div>",
        f"<div>measured FPR<b>{_pct(s['measured_fpr'])}</b></div>",
        f"<div>recall<b>{_pct(s['recall'])}</b></div></div>",
        "<table><tr><th class='l'>operating point</th><th>threshold</th><th>expected FPR</th>"
        "<th>measured FPR</th><th>recall</th><th>precision</th><th>F1</th><th>tn/fp/fn/tp</th>"
        "</tr>",
    ]
    for name, p in m["operating_points"].items():
        star = " (default)" if name == m["default_operating_point"] else ""
        parts.append(f"<tr><td class='l'>{e(name + star)}</td><td>{_fmt(p['threshold'], 6)}</td>"
                     f"<td>{_fmt(p['expected_fpr'])}</td><td>{_fmt(p['fpr'])}</td>"
                     f"<td>{_fmt(p['recall'])}</td><td>{_fmt(p['precision'])}</td>"
                     f"<td>{_fmt(p['f1'])}</td>"
                     f"<td>{p['tn']}/{p['fp']}/{p['fn']}/{p['tp']}</td></tr>")
    parts.append("</table>")
    toc = [f"<li><a href='#{f.removesuffix('.png')}'>{e(t)}</a></li>"
           for f, t in FIGURES.items() if f in figs]
    parts.append("<nav><b>Figures</b><ol>" + "".join(toc) + "</ol></nav>")

    def figure(fname: str) -> None:
        title = FIGURES[fname]
        anchor = fname.removesuffix(".png")
        if fname not in figs:
            parts.append(f"<h3 id='{anchor}'>{e(title)}</h3><p class='note'>"
                         f"{e(notes.get(fname, 'Not available.'))}</p>")
            return
        parts.append(f"<figure id='{anchor}'>{_img(fname, figs[fname], title)}"
                     f"<figcaption><b>{e(title)}</b> ({e(fname)}). "
                     f"{e(_CAPTIONS.get(fname, ''))}</figcaption></figure>")

    parts.append("<h2>Detection</h2>")
    for f in ("roc_pr.png", "score_histogram.png", "per_class.png"):
        figure(f)
    df = ev.per_class
    op_cols = [c for c in df.columns if c.startswith("flagged@")]
    parts.append("<table><tr><th>class</th><th class='l'>name</th><th class='l'>role</th>"
                 "<th>n</th><th>mean score</th>"
                 + "".join(f"<th>{e(c)}</th>" for c in op_cols) + "</tr>")
    for _, r in df.iterrows():
        parts.append(f"<tr><td>{r['class']}</td><td class='l'>{e(str(r['name']))}</td>"
                     f"<td class='l'>{e(r['role'])}</td><td>{r['n']}</td>"
                     f"<td>{_fmt(float(r['mean_score']))}</td>"
                     + "".join(f"<td>{float(r[c]):.3f}</td>" for c in op_cols) + "</tr>")
    parts.append("</table><p class='note'>flagged@P: the detection rate of an anomaly class, "
                 "the false-alarm rate of a normal class.</p>")
    figure("confusion_matrix.png")
    parts.append("<h2>Reconstructions</h2>")
    for f in ("recon_typical_normal.png", "recon_top_anomalies.png", "recon_false_positives.png",
              "recon_false_negatives.png"):
        figure(f)
    parts.append("<h2>Latent space</h2>")
    figure("latent.png")
    figure("latent_tsne.png")
    ari = s.get("kmeans_ari") or {}
    if ari:
        parts.append("<p>k-means on the latent codes (k = number of classes, 10 restarts): "
                     "how well the clusters recover the classes (adjusted Rand index: 1 = "
                     "perfect, 0 = chance).</p><table><tr><th class='l'>images</th><th>k</th>"
                     "<th>n</th><th>ARI</th></tr>")
        for what, r in ari.items():
            parts.append(f"<tr><td class='l'>{e(what)}</td><td>{r['k']}</td><td>{r['n']}</td>"
                         f"<td>{r['ari']:.3f}</td></tr>")
        parts.append("</table>")
        if "normal classes" not in ari:
            parts.append("<p class='note'>The model was trained on one normal class: the "
                         "normal-classes row needs several.</p>")
    parts.append("<h2>The generative model</h2>")
    for f in ("manifold.png", "interpolation.png", "affine.png", "denoise.png"):
        figure(f)
    parts.append("<h2>Training</h2>")
    figure("training.png")
    parts.append("<p class='note'>Scores: higher = more anomalous; an image is anomalous when "
                 "its score is above the operating point's threshold.</p></main></body></html>")
    return "\n".join(parts)


def report_after_fit(result) -> Path | None:
    """The report at the end of ``anomaly fit``: never fails the fit, whose artifact is saved.

    Returns:
        The ``report.html`` path, or ``None`` when there was nothing to report on or it failed
        (a warning on stderr says why and how to retry).
    """
    if result.path is None:  # a non-chief worker of a multi-worker fit writes nothing
        return None
    if result.evaluation is None:
        print("Report: skipped (no labelled test data to evaluate on)")
        return None
    try:
        rep = build_report(result.path, detector=result.detector)
    except Exception as exc:  # the artifact is already saved: warn, do not fail the fit
        _log(f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
             f"run 'anomaly report {result.path}' to try again")
        return None
    print(f"Report: {rep.html}")
    return rep.html
