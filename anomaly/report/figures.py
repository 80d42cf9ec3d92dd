"""The report's figures: one builder per figure, each declared once in :data:`FIGURES`.

A :class:`FigureSpec` holds everything about a figure: its file name, section, title,
caption and builder. The builder takes the :class:`~anomaly.report.analysis.ReportData` and
returns a matplotlib ``Figure``, or the data's :class:`~anomaly.report.analysis.Missing` when
the figure does not apply (the page then shows its reason). The page, the files on disk and
``summary.json`` all come from this one registry.

Plotting uses matplotlib's object API on the Agg canvas (no global figure state, no display);
matplotlib is imported only when a figure is drawn. Image shapes come from the arrays:
``(H, W)`` grey, or ``(H, W, 3)`` shown as RGB.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from anomaly.report.analysis import (
    ImageSet,
    Latent,
    Manifold,
    MaskSet,
    Missing,
    ReportData,
    Rows,
    ScoreParts,
    Training,
    Uniformity,
    Upscaled,
)

DPI = 100
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
#: Pixels between images in a mosaic.
PAD = 3
#: Colour of the ground-truth mask contour: it must stand out on the inferno heat map.
CONTOUR_COLOR = "#00e5ff"


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report."""

    file: str
    section: str
    title: str
    caption: str
    build: Callable[[ReportData], object]

    @property
    def anchor(self) -> str:
        return self.file.removesuffix(".png")


#: File name -> spec, in page order.
FIGURES: dict[str, FigureSpec] = {}


def register(file: str, section: str, title: str, caption: str = ""):
    """Decorator: declare the decorated builder as the figure ``file``."""
    def deco(fn):
        FIGURES[file] = FigureSpec(file, section, title, caption, fn)
        return fn
    return deco


def render(spec: FigureSpec, data: ReportData) -> bytes | Missing:
    """PNG bytes of one figure, or why it is left out."""
    fig = spec.build(data)
    if isinstance(fig, Missing):
        return fig
    buf = io.BytesIO()
    # zlib level 1: files 4% larger than the default 6, written in a third less time.
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


# -- helpers --------------------------------------------------------------------------------------


def new_figure(w: float, h: float):
    """An empty figure of ``w`` x ``h`` inches on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def wrap(text: str, fig, fontsize: float = 10) -> str:
    """Break a title into lines that fit the figure's width."""
    width = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))
    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def displayable(images: np.ndarray) -> np.ndarray:
    """``(k, H, W)`` grey or ``(k, H, W, 3)`` RGB for ``imshow``; a single channel is dropped."""
    a = np.asarray(images, np.float32)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise ValueError(f"images of shape (k, H, W) or (k, H, W, 3), got {a.shape}")
    return np.clip(a, 0.0, None)


def mosaic(images: np.ndarray, pad: int = PAD, fill: float = 1.0) -> np.ndarray:
    """Images ``(k, H, W[, 3])`` side by side with ``pad`` pixels of ``fill`` between them:
    ``(H, k * W + (k - 1) * pad[, 3])``."""
    imgs = displayable(images)
    k, h, w = imgs.shape[:3]
    out = np.full((h, k * w + (k - 1) * pad, *imgs.shape[3:]), fill, np.float32)
    for j, img in enumerate(imgs):
        out[:, j * (w + pad) : j * (w + pad) + w] = img
    return out


def grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Images ``(rows * cols, H, W[, 3])`` row-major -> one ``(rows * H, cols * W[, 3])``."""
    imgs = displayable(images)
    h, w = imgs.shape[1:3]
    tail = imgs.shape[3:]
    g = imgs.reshape(rows, cols, h, w, *tail).swapaxes(1, 2)
    return g.reshape(rows * h, cols * w, *tail)


def centers(k: int, width: int, pad: int = PAD) -> np.ndarray:
    """x of the middle of each of ``k`` images of ``width`` pixels in a :func:`mosaic`."""
    return np.arange(k) * (width + pad) + (width - 1) / 2


def image_rows(fig, rows, row_labels, col_labels, *, maps: dict | None = None,
               col_colors=None):
    """One axes per row, each showing its images side by side (fast to lay out and draw);
    column labels over the first row. ``maps``: row index -> ``(cmap, vmax)`` for rows of
    2-D heat maps (from 0). Returns the axes and their images."""
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    ims = []
    for i, (ax, row) in enumerate(zip(axes, rows, strict=True)):
        if maps and i in maps:
            cmap, vmax = maps[i]
            ims.append(ax.imshow(mosaic(row, fill=0.0), cmap=cmap, vmin=0, vmax=vmax,
                                 interpolation="nearest"))
        else:
            m = mosaic(row)
            kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if m.ndim == 2 else {}
            ims.append(ax.imshow(np.clip(m, 0, 1), interpolation="nearest", **kw))
        ax.set_yticks([])
        ax.set_ylabel(row_labels[i], fontsize=9)
        ax.set_xticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
    width = displayable(rows[0]).shape[2]
    axes[0].xaxis.tick_top()
    axes[0].set_xticks(centers(len(rows[0]), width), col_labels, fontsize=7)
    axes[0].tick_params(axis="x", length=0)
    if col_colors is not None:
        for lbl, color in zip(axes[0].get_xticklabels(), col_colors, strict=True):
            lbl.set_color(color)
    return axes, ims


def _op_color(i: int) -> str:
    return COLORS[(i + 2) % len(COLORS)]


# -- detection ------------------------------------------------------------------------------------


@register("roc.png", "Detection", "ROC curve",
          "Left: the whole curve. Right: the same curve on a logarithmic FPR axis, where "
          "the low false-alarm rates a detector is run at can be read; the shaded part is the "
          "partial AUROC's range (FPR up to 10%). Every operating point of the calibration is "
          "marked where it lands on the test set.")
def _fig_roc(d: ReportData):
    from sklearn.metrics import RocCurveDisplay, roc_curve

    r = d.ranking
    if isinstance(r, Missing):
        return r
    fig = new_figure(11, 4.8)
    ax1, ax2 = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(d.y, d.scores)
    # Built from the curve, not from_predictions, so the label carries our interval only.
    RocCurveDisplay(fpr=fpr, tpr=tpr, name=f"AUROC {r.auroc:.4f}, 95% CI "
                    f"[{r.auroc_ci[0]:.4f}, {r.auroc_ci[1]:.4f}]").plot(
        ax=ax1, plot_chance_level=True)
    n_normal = int(np.sum(d.y == 0))
    floor = 0.5 / max(n_normal, 1)  # FPR 0 has no place on a log axis: draw it here
    ax2.plot(np.maximum(fpr, floor), tpr, color=COLORS[0], lw=2,
             label=f"partial AUROC up to FPR {r.partial_max_fpr:.0%}, McClish-standardized "
             f"(0.5 = chance): {r.partial_auroc:.4f}")
    grid_fpr = np.logspace(np.log10(floor), 0, 50)
    ax2.plot(grid_fpr, grid_fpr, ls="--", color="grey", lw=1, label="chance")
    ax2.axvspan(floor, r.partial_max_fpr, color=COLORS[0], alpha=0.07)
    ax2.set_xscale("log")
    for i, c in enumerate(d.fpr_checks):
        if c.measured_fpr is None or c.recall is None:
            continue
        star = " (default)" if c.default else ""
        for ax, xv in ((ax1, c.measured_fpr), (ax2, max(c.measured_fpr, floor))):
            ax.plot(xv, c.recall, "o", ms=9, color=_op_color(i), mec="black",
                    label=f"{c.name}{star}: FPR {c.measured_fpr:.3f}, TPR {c.recall:.3f}")
    ax1.set(title="ROC curve (test set)", xlabel="false-positive rate (normal images flagged)",
            ylabel="true-positive rate (anomalies flagged)", xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01))
    ax2.set(title=f"ROC, log FPR axis (partial AUROC {r.partial_auroc:.4f})",
            xlabel="false-positive rate (log scale; FPR 0 drawn at the left edge)",
            ylabel="true-positive rate", xlim=(floor, 1.0), ylim=(-0.01, 1.01))
    for ax in (ax1, ax2):
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    return fig


@register("pr_normal.png", "Detection", "Precision-recall curve, normal images as positives",
          "Normal images are the positives here: with anomalies as positives the curve sits "
          "near 1 whatever the detector (their share of the test set is its chance level). "
          "An image is called normal when its score is at or below the threshold.")
def _fig_pr_normal(d: ReportData):
    from sklearn.metrics import PrecisionRecallDisplay, precision_recall_curve

    r = d.ranking
    if isinstance(r, Missing):
        return r
    fig = new_figure(7.5, 5.2)
    ax = fig.subplots()
    # Normal images are the positives: a lower score means more normal.
    precision, recall, _ = precision_recall_curve(1 - d.y, -d.scores)
    PrecisionRecallDisplay(precision, recall, pos_label=1,
                           prevalence_pos_label=r.normal_fraction,
                           name=f"normal as positives (AP {r.average_precision_normal:.4f})"
                           ).plot(ax=ax, plot_chance_level=True)
    for i, (name, p) in enumerate(d.evaluation.metrics["operating_points"].items()):
        if p["tn"] + p["fp"] == 0:
            continue
        recall_n = p["tn"] / (p["tn"] + p["fp"])
        precision_n = p["tn"] / (p["tn"] + p["fn"]) if p["tn"] + p["fn"] else 1.0
        star = " (default)" if name == d.calibration.default else ""
        ax.plot(recall_n, precision_n, "o", ms=9, color=_op_color(i), mec="black",
                label=f"{name}{star}: recall {recall_n:.3f}, precision {precision_n:.3f}")
    ax.set(title=wrap(f"Precision-recall with normal images as positives (chance level "
                      f"{r.normal_fraction:.3f} = their share; AP with anomalies as positives: "
                      f"{r.average_precision:.4f})", fig, 11),
           xlabel="recall of normal images (1 - FPR)",
           ylabel="precision (images called normal that are normal)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


@register("score_histogram.png", "Detection", "Score distributions",
          "Densities of the test scores; the black outline is the normal validation "
          "(calibration) images; one vertical line per operating point threshold.")
def _fig_histogram(d: ReportData):
    scores, y, cal = d.scores, d.y, d.calibration
    fig = new_figure(10, 4.4)
    ax = fig.subplots()
    thresholds = [op.threshold for op in cal.operating_points.values()]
    lo = float(min(scores.min(), *thresholds))
    hi = float(max(np.quantile(scores, 0.995), *thresholds))
    hi = hi if hi > lo else lo + 1.0
    bins = np.linspace(lo, hi + 0.02 * (hi - lo), 60)
    clipped = np.clip(scores, bins[0], bins[-1])
    n_clip = int(np.sum(scores > bins[-1]))
    for label, mask, color in (("normal test images", y == 0, COLORS[0]),
                               ("anomalous test images", y == 1, COLORS[1])):
        if mask.any():
            ax.hist(clipped[mask], bins=bins, density=True, alpha=0.55, color=color,
                    label=f"{label} ({int(mask.sum())})")
    ref = np.clip(cal.reference_scores, bins[0], bins[-1])
    ax.hist(ref, bins=bins, density=True, histtype="step", lw=1.5, color="black",
            label=f"normal validation images, calibration ({len(ref)})")
    styles = ("-", "--", ":", "-.")
    for i, (name, op) in enumerate(cal.operating_points.items()):
        star = " (default)" if name == cal.default else ""
        ax.axvline(op.threshold, color=_op_color(i), lw=2, ls=styles[i % len(styles)],
                   label=f"threshold {name}{star} = {op.threshold:.4g}")
    note = f"; {n_clip} scores above {bins[-1]:.3g} in the last bin" if n_clip else ""
    ax.set(title=wrap(f"Anomaly scores of normal vs anomalous test images{note}", fig, 12),
           xlabel=f"anomaly score ({d.score_name}; higher = more anomalous)", ylabel="density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


@register("per_class.png", "Detection", "Detection rate per class",
          "Fraction of each test class flagged at each operating point: the detection rate "
          "of an anomaly class, the false-alarm rate of a normal class (hatched).")
def _fig_per_class(d: ReportData):
    from matplotlib.patches import Patch

    df = d.evaluation.per_class
    ops_ = list(d.evaluation.metrics["operating_points"])
    fig = new_figure(min(16, max(7, 0.9 * len(df) * max(1, len(ops_)) + 3)), 4.8)
    ax = fig.subplots()
    x = np.arange(len(df))
    width = 0.8 / len(ops_)
    handles = []
    for i, op in enumerate(ops_):
        star = " (default)" if op == d.calibration.default else ""
        color = COLORS[i % len(COLORS)]
        bars = ax.bar(x + (i - (len(ops_) - 1) / 2) * width, df[f"flagged@{op}"], width,
                      color=color, edgecolor="black", linewidth=0.5)
        for bar, role in zip(bars, df["role"], strict=True):
            if role == "normal":
                bar.set_hatch("//")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        handles.append(Patch(facecolor=color, edgecolor="black", linewidth=0.5,
                             label=f"flagged at {op}{star}"))
    if (df["role"] == "normal").any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="hatched: normal class (false alarms)"))
    ax.set_xticks(x, [f"{r['name']}\n({r['role']}, n={r['n']})" for _, r in df.iterrows()],
                  fontsize=8)
    ax.set(title="Fraction of each test class flagged\n(detection rate of anomaly classes; "
           "false-alarm rate of normal classes, hatched)", xlabel="test class",
           ylabel="fraction of the class flagged", ylim=(0, 1.12))
    ax.legend(handles=handles, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


@register("confusion_matrix.png", "Detection", "Confusion matrix",
          "At the default operating point; colours are the fraction of the true class.")
def _fig_confusion(d: ReportData):
    from sklearn.metrics import ConfusionMatrixDisplay

    name = d.calibration.default
    p = d.evaluation.metrics["operating_points"][name]
    cm = np.array([[p["tn"], p["fp"]], [p["fn"], p["tp"]]])
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = new_figure(5.8, 4.6)
    ax = fig.subplots()
    disp = ConfusionMatrixDisplay(frac, display_labels=["normal", "anomaly"])
    disp.plot(ax=ax, cmap="Blues", values_format=".1%", colorbar=True, im_kw={"vmin": 0,
                                                                              "vmax": 1})
    for i in range(2):
        for j in range(2):
            disp.text_[i, j].set_text(f"{cm[i, j]}\n({frac[i, j]:.1%} of row)")
    ax.set(title=f"Confusion matrix at {name} (threshold {p['threshold']:.4g})",
           xlabel="predicted (score > threshold = anomaly)", ylabel="true label")
    return fig


# -- calibration ----------------------------------------------------------------------------------


@register("fpr_check.png", "Calibration", "Expected vs measured false-positive rate",
          "Each operating point's FPR on the normal validation images it was calibrated on "
          "(expected) and on the normal test images (measured), with 95% exact binomial "
          "(Clopper-Pearson) intervals. Red: the expected FPR is outside the measured "
          "interval.")
def _fig_fpr_check(d: ReportData):
    checks = [c for c in d.fpr_checks if c.measured_fpr is not None]
    if not checks:
        return Missing("No normal test images: no FPR to measure.")
    fig = new_figure(max(6, 1.6 * len(checks) + 3), 4.4)
    ax = fig.subplots()
    for i, c in enumerate(checks):
        for dx, v, (lo, hi), color, label in (
                (-0.12, c.expected_fpr, c.expected_ci, "black",
                 f"expected (n={c.n_val} validation)"),
                (0.12, c.measured_fpr, c.measured_ci, COLORS[1] if not c.agrees else COLORS[0],
                 f"measured (n={c.n_normal} test)")):
            ax.errorbar(i + dx, v, yerr=[[v - lo], [hi - v]], fmt="o", color=color, capsize=5,
                        ms=7, label=label if i == 0 else None)
        ax.annotate("disagree" if not c.agrees else "agree",
                    (i, max(c.expected_ci[1], c.measured_ci[1])), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8,
                    color=COLORS[1] if not c.agrees else "#006000")
    ax.set_xticks(np.arange(len(checks)),
                  [c.name + (" (default)" if c.default else "") for c in checks])
    ax.set(title=wrap("False-positive rate per operating point: expected (validation) vs "
                      "measured (test), 95% Clopper-Pearson intervals", fig, 11),
           ylabel="false-positive rate", xlim=(-0.6, len(checks) - 0.4))
    top = max(max(c.expected_ci[1], c.measured_ci[1]) for c in checks)
    ax.set_ylim(0, 1.15 * top + 1e-3)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


@register("uniformity.png", "Calibration", "Normalized scores of normal test images",
          "The normalized score is the fraction of normal validation images that scored at or "
          "below an image. On normal test images it should be uniform on [0, 1] when "
          "validation and test normals are alike; the Kolmogorov-Smirnov statistic is the "
          "largest vertical gap between the two curves on the left.")
def _fig_uniformity(d: ReportData):
    u = d.uniformity
    if isinstance(u, Missing):
        return u
    if not isinstance(u, Uniformity):
        return Missing("Not computed.")
    n = len(u.normalized)
    fig = new_figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    ecdf = np.arange(1, n + 1) / n
    ax1.step(np.r_[0.0, u.normalized], np.r_[0.0, ecdf], where="post", color=COLORS[0], lw=2,
             label=f"normal test images (n={n})")
    ax1.plot([0, 1], [0, 1], ls="--", color="grey", label="uniform")
    ax1.set(title=f"ECDF vs uniform: KS {u.ks_statistic:.3f} (two-sample p = "
                  f"{u.ks2_pvalue:.3g})",
            xlabel="normalized score", ylabel="fraction of normal test images at or below",
            xlim=(0, 1), ylim=(0, 1))
    ax1.legend(fontsize=8)
    ax2.hist(u.normalized, bins=20, range=(0, 1), density=True, color=COLORS[0], alpha=0.6,
             label="normal test images")
    ax2.axhline(1.0, ls="--", color="grey", label="uniform density")
    ax2.set(title=f"Histogram (the reference has {u.n_reference} validation scores)",
            xlabel="normalized score", ylabel="density", xlim=(0, 1))
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return fig


@register("score_parts.png", "Calibration", "The parts of the mse+knn(+tp) score",
          "Each part standardized on the normal validation images as the score does; the "
          "score is their sum. mse+knn: reconstruction part against latent part, the "
          "threshold the dashed line x + y = threshold. mse+knn+tp: that pair (left) and "
          "their sum against the transformation-prediction part (right), where the dashed "
          "line is the threshold. Images above it are flagged.")
def _fig_score_parts(d: ReportData):
    sp = d.score_parts
    if not isinstance(sp, ScoreParts):
        return sp
    three = sp.parts.shape[1] == 3
    fig = new_figure(12 if three else 7, 6)
    axes = fig.subplots(1, 2) if three else [fig.subplots()]
    names = ("reconstruction part: (log error - m1) / s1",
             "latent part: (log kNN distance - m2) / s2")
    panels = [(sp.parts[:, 0], sp.parts[:, 1], *names, not three)]
    if three:
        panels.append((sp.parts[:, 0] + sp.parts[:, 1], sp.parts[:, 2],
                       "reconstruction + latent parts",
                       "transformation part: (log tp NLL - m3) / s3", True))
    for ax, (px, py, xlabel, ylabel, line) in zip(axes, panels, strict=True):
        for label, mask, color, marker in (("normal", sp.y == 0, COLORS[0], "o"),
                                           ("anomaly", sp.y == 1, COLORS[1], "x")):
            if mask.any():
                ax.scatter(px[mask], py[mask], s=12, alpha=0.6, color=color, marker=marker,
                           label=f"{label} test images ({int(mask.sum())})")
        lo, hi = float(min(px.min(), py.min())), float(max(px.max(), py.max()))
        if line:
            xs = np.linspace(lo, hi, 2)
            ax.plot(xs, sp.threshold - xs, ls="--", color="black",
                    label=f"threshold {sp.operating_point}: x + y = {sp.threshold:.3g}")
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(lo - 0.5, hi + 0.5), ylim=(lo - 0.5, hi + 0.5))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    score = "mse+knn+tp" if three else "mse+knn"
    fig.suptitle(wrap(f"{score}: the standardized parts of {len(sp.y)} test images", fig))
    return fig


# -- reconstructions ------------------------------------------------------------------------------


def fig_recon(d: ReportData, kind: str):
    """A reconstruction grid of the images ``d.groups[kind]``: originals ``(k, H, W[, 3])``,
    reconstructions, and error maps ``(k, H, W)`` on the shared scale ``d.error_vmax``."""
    g = d.groups.get(kind, Missing("Not computed."))
    if not isinstance(g, ImageSet):
        return g
    k = len(g.x)
    fig = new_figure(max(6.5, 1.25 * k + 2.2), 5.4)
    cols = [f"{g.labels[j]}\nscore {g.scores[j]:.4g}\n"
            f"{'flagged' if g.flagged[j] else 'not flagged'}" for j in range(k)]
    colors = ["#c00000" if f else "#006000" for f in g.flagged]
    axes, ims = image_rows(fig, [g.x, g.reconstruction, g.error_map],
                           ["original", "reconstruction", "error map"], cols,
                           maps={2: ("inferno", d.error_vmax)}, col_colors=colors)
    fig.colorbar(ims[2], ax=axes[2], label=f"per-pixel {d.error_name}\n(same scale in every "
                 "grid)", shrink=0.9, pad=0.01)
    threshold = d.calibration.get().threshold
    fig.suptitle(wrap(f"{g.title}\n(threshold {threshold:.4g}; red = flagged as anomalous)",
                      fig), fontsize=10)
    fig.supxlabel("test images (columns), each with its reconstruction and error map",
                  fontsize=9)
    return fig


_ERR_CAPTION = ("Error maps of all four grids share one colour scale, so they compare across "
                "grids.")
for _kind, _title in (("typical_normal", "Reconstructions: typical normal images"),
                      ("top_anomalies", "Reconstructions: highest-scoring anomalies"),
                      ("false_positives", "Reconstructions: worst false positives"),
                      ("false_negatives", "Reconstructions: worst false negatives")):
    register(f"recon_{_kind}.png", "Reconstructions", _title, _ERR_CAPTION)(
        partial(fig_recon, kind=_kind))


# -- localization ---------------------------------------------------------------------------------


@register("mask_errors.png", "Localization", "Error maps over the ground-truth masks",
          "For each defect type its highest- and median-scored test image: the image, its "
          "per-pixel error map, and the same map with the ground-truth mask's outline "
          "(contour at 0.5). Error inside the outline is a defect found where it is; error "
          "outside it, a false alarm of those pixels. The maps share one colour scale.")
def fig_mask_errors(d: ReportData):
    """Images ``(k, H, W[, 3])``, error maps ``(k, H, W)`` and the masks' outlines over the
    maps, from ``d.mask_errors``; each column titled with its defect type and score."""
    m = d.mask_errors
    if not isinstance(m, MaskSet):
        return m
    k = len(m.x)
    fig = new_figure(max(6.5, 1.25 * k + 2.2), 5.4)
    cols = [f"{m.defects[j]}\n{m.picks[j]}, score {m.scores[j]:.4g}" for j in range(k)]
    colors = ["#c00000" if f else "#006000" for f in m.flagged]
    maps = {1: ("inferno", m.vmax), 2: ("inferno", m.vmax)}
    axes, ims = image_rows(fig, [m.x, m.error_map, m.error_map],
                           ["image", "error map", "error map,\nmask outline"], cols,
                           maps=maps, col_colors=colors)
    # On the mosaic itself: the background between images keeps the outlines apart.
    ax = axes[2]
    xlim, ylim = ax.get_xlim(), ax.get_ylim()  # contour rescales the view: keep the image's
    ax.contour(mosaic(m.masks, fill=0.0), levels=[0.5], colors=CONTOUR_COLOR, linewidths=1.2)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    fig.colorbar(ims[1], ax=list(axes[1:]), label=f"per-pixel {d.error_name}", shrink=0.9,
                 pad=0.01)
    fig.suptitle(wrap(f"{m.title}\n(threshold {d.calibration.get().threshold:.4g}; red = "
                      "flagged as anomalous)", fig), fontsize=10)
    fig.supxlabel("test images (columns): defect type, which pick, score", fontsize=9)
    return fig


# -- latent space ---------------------------------------------------------------------------------


def _scatter(d: ReportData, lat: Latent):
    fig = new_figure(7.5, 6)
    ax = fig.subplots()
    for i, c in enumerate(np.unique(lat.classes)):
        mask = lat.classes == c
        ax.scatter(lat.points[mask, 0], lat.points[mask, 1], s=12, alpha=0.7,
                   marker="o" if int(c) in d.normal_classes else "x",
                   color=COLORS[i % len(COLORS)], label=d.class_label(int(c)))
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.grid(alpha=0.3)
    ax.set(title=wrap(lat.title, fig), xlabel=lat.xlabel, ylabel=lat.ylabel)
    ax.title.set_fontsize(10)
    return fig


@register("latent.png", "Latent space", "Latent space",
          "Latent means (VAEs) or codes (autoencoders) of test images, coloured by class; "
          "circles are normal classes, crosses anomaly classes.")
def _fig_latent(d: ReportData):
    return _scatter(d, d.latent)


@register("latent_tsne.png", "Latent space", "Latent space (t-SNE)",
          "t-SNE is run on a small random subset: it is slow and only its local "
          "neighbourhoods are meaningful, not distances between clusters.")
def _fig_tsne(d: ReportData):
    return d.tsne if isinstance(d.tsne, Missing) else _scatter(d, d.tsne)


# -- the generative model -------------------------------------------------------------------------


@register("manifold.png", "The generative model", "Decoded latent grid (manifold)",
          "What the decoder makes of codes it was not given: standard normal quantiles "
          "0.05..0.95, as in the VAE tutorials.")
def _fig_manifold(d: ReportData):
    m = d.manifold
    if not isinstance(m, Manifold):
        return m
    img = grid(m.images, m.rows, m.cols)
    h, w = displayable(m.images).shape[1:3]
    fig = new_figure(7.6, 7.2 if m.rows > 1 else 2.2)
    ax = fig.subplots()
    kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if img.ndim == 2 else {}
    ax.imshow(np.clip(img, 0, 1), **kw)
    ax.set_xticks(np.arange(m.cols) * w + (w - 1) / 2, [f"{v:.2f}" for v in m.x_values],
                  fontsize=7)
    if m.y_values is not None:
        ax.set_yticks(np.arange(m.rows) * h + (h - 1) / 2, [f"{v:.2f}" for v in m.y_values],
                      fontsize=7)
    else:
        ax.set_yticks([])
    ax.set(title=wrap(m.title, fig), xlabel=m.xlabel, ylabel=m.ylabel)
    ax.title.set_fontsize(10)
    return fig


def fig_rows(r: Rows | Missing):
    """Rows of images side by side (each ``(k, H, W[, 3])``), or the reason there are none."""
    if not isinstance(r, Rows):
        return r
    k = len(r.rows[0])
    fig = new_figure(max(6.5, 1.05 * k + 2.4), 1.6 * len(r.rows) + 1.3)
    image_rows(fig, r.rows, r.row_labels, r.col_labels)
    fig.suptitle(wrap(r.title, fig), fontsize=10)
    fig.supxlabel(r.xlabel, fontsize=9)
    return fig


register("interpolation.png", "The generative model", "Latent interpolations",
         "Rows: a typical normal image to the highest-scoring anomaly, and to the farthest "
         "normal image (of another normal class when there is one).")(
    lambda d: fig_rows(d.interpolation))
register("affine.png", "The generative model",
         "Normalized reconstructions (affine transform removed)",
         "The affine units (rotation, shear, scale, shift) are set to the identity in the "
         "normalized reconstruction: slanted images come out straightened.")(
    lambda d: fig_rows(d.affine))
def _show(ax, image: np.ndarray) -> None:
    """One image ``(H, W[, 3])`` pixel for pixel, without ticks."""
    a = displayable(image[None])[0]
    kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if a.ndim == 2 else {}
    ax.imshow(np.clip(a, 0, 1), interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


@register("decode_2x.png", "The generative model", "Decoding on a 2x finer grid",
          "The same weights decode each test image at its size (1x) and on a pixel grid twice "
          "as fine over the same extent (2x), each drawn at its own resolution in a panel of "
          "the same size: one 1x pixel covers four 2x pixels. The decoder was trained only at "
          "the 1x pixel positions, so the extra detail of the 2x is the network's "
          "interpolation between them, not detail recovered from the image.")
def fig_upscaled(d: ReportData):
    """Rows of original ``(H, W[, 3])``, 1x reconstruction and the ``(s*H, s*W[, 3])``
    decoding of ``d.upscaled``, in panels of one size (the 2x is not resized to H x W)."""
    u = d.upscaled
    if not isinstance(u, Upscaled):
        return u
    h, w = u.x.shape[1:3]
    s = u.scale
    # A panel's longer side in inches: a screen pixel per 2x pixel, so the PNG does not
    # resample it away (up to 8 in, about 400 px sides at 2x).
    side = min(8.0, max(1.8, s * max(h, w) / DPI))
    ph, pw = side * h / max(h, w), side * w / max(h, w)
    rows = min(len(u.x), max(1, int(22 / (ph + 0.45))))
    fig = new_figure(3 * pw + 1.8, rows * (ph + 0.45) + 0.9)
    axes = fig.subplots(rows, 3, squeeze=False)
    heads = [f"original ({h}x{w})", f"reconstruction, 1x ({h}x{w})",
             f"decoded at {s}x ({s * h}x{s * w})"]
    for i in range(rows):
        for j, img in enumerate((u.x[i], u.reconstruction[i], u.upscaled[i])):
            _show(axes[i, j], img)
            if i == 0:
                axes[i, j].set_title(heads[j], fontsize=9)
        axes[i, 0].set_ylabel(f"{u.labels[i]}\nscore {u.scores[i]:.3g}", fontsize=8)
    fig.suptitle(wrap(f"{u.title}; the extra detail of the {s}x is the network's "
                      "interpolation", fig), fontsize=10)
    return fig


register("denoise.png", "The generative model", "Denoising",
         "Noise of the strength the model was trained to remove (--denoise).")(
    lambda d: fig_rows(d.denoising))


# -- training -------------------------------------------------------------------------------------


@register("training.png", "Training", "Training curves",
          "Per-epoch losses; the star marks the kept epoch (lowest validation loss), whose "
          "weights early stopping restored. Log scale, so the first epoch does not flatten "
          "the rest (when a loss is not positive, the y range leaves out the first epoch).")
def _fig_training(d: ReportData):
    from matplotlib.ticker import MaxNLocator

    t = d.training
    if not isinstance(t, Training):
        return t
    hist, epochs = t.history, t.epochs
    panels = [("Total loss", (("loss", "training"), ("val_loss", "validation")))]
    if t.variational and "kl_loss" in hist:
        panels += [("Reconstruction term", (("reconstruction_loss", "training"),
                                            ("val_reconstruction_loss", "validation"))),
                   ("KL term", (("kl_loss", "training"), ("val_kl_loss", "validation")))]
    fig = new_figure(4.6 * len(panels) + 0.6, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    kept = None if t.kept_epoch is None else int(np.flatnonzero(epochs == t.kept_epoch)[0])
    for ax, (title, series) in zip(axes, panels, strict=True):
        values = []
        for i, (col, label) in enumerate(series):
            if col in hist and hist[col].notna().any():
                v = hist[col].to_numpy(np.float64)
                values.append(v)
                ax.plot(epochs, v, marker="o", ms=4, color=COLORS[i], label=label)
                if kept is not None and np.isfinite(v[kept]):
                    ax.plot(epochs[kept], v[kept], "*", ms=15, color=COLORS[i], mec="black",
                            label=f"kept epoch {t.kept_epoch}" if i == 1 else None)
        if kept is not None:
            ax.axvline(epochs[kept], color="grey", ls=":", lw=1)
        allv = np.concatenate(values) if values else np.zeros(0)
        allv = allv[np.isfinite(allv)]
        if len(allv) and (allv > 0).all():
            ax.set_yscale("log")
        elif len(epochs) > 2 and values:
            later = np.concatenate([v[1:] for v in values])
            later = later[np.isfinite(later)]
            if len(later):
                pad = 0.05 * (later.max() - later.min() or 1.0)
                ax.set_ylim(later.min() - pad, later.max() + pad)
        ax.set(title=title, xlabel="epoch", ylabel="loss per image")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Training curves (normal training and validation images)", fontsize=11)
    return fig
