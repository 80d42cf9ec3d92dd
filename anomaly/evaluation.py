"""Evaluation on a labelled test set: AUROC, average precision, and each operating point.

Labels: 1 = anomaly (positive class), 0 = normal. Scores: higher = more anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from anomaly.calibration import Calibration, check_measured_fpr


@dataclass
class Evaluation:
    """Test-set metrics.

    Attributes:
        metrics: JSON-ready dict: ``auroc``, ``average_precision``, counts, and per operating
            point ``threshold``, ``precision``, ``recall``, ``f1``, ``fpr`` and the confusion
            matrix counts ``tn``, ``fp``, ``fn``, ``tp``.
        per_class: one row per original class: ``class``, ``name``, ``role`` (normal/anomaly),
            ``n``, and per operating point the fraction flagged (detection rate for anomaly
            classes, false-alarm rate for normal ones) and the mean score.
    """

    metrics: dict
    per_class: pd.DataFrame


def point_metrics(y_true: np.ndarray, flagged: np.ndarray) -> dict:
    """Precision, recall, F1, FPR and confusion counts for binary decisions ``(N,)``."""
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, flagged, labels=[0, 1]).ravel())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "fpr": fpr,
            "tn": tn, "fp": fp, "fn": fn, "tp": tp}


def evaluate(scores: np.ndarray, y_true: np.ndarray, calibration: Calibration,
             classes: np.ndarray | None = None,
             class_names: tuple[str, ...] | None = None) -> Evaluation:
    """Evaluate scores ``(N,)`` against binary labels ``(N,)`` (1 = anomaly).

    ``classes`` ``(N,)`` holds the original class of each image for the per-class table.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true).astype(int)
    both = 0 < y_true.sum() < len(y_true)
    metrics: dict = {
        "n_test": len(y_true),
        "n_anomalies": int(y_true.sum()),
        "auroc": float(roc_auc_score(y_true, scores)) if both else None,
        "average_precision": float(average_precision_score(y_true, scores)) if both else None,
        "default_operating_point": calibration.default,
        "operating_points": {},
    }
    n_normal = int((y_true == 0).sum())
    for name, op in calibration.operating_points.items():
        pm = point_metrics(y_true, calibration.decide(scores, name))
        entry = {"threshold": op.threshold, "expected_fpr": op.expected_fpr,
                 "fpr_interval": list(op.fpr_interval) if op.fpr_interval else None,
                 "n_reference": op.n_reference, **pm}
        if n_normal:
            check = check_measured_fpr(op, pm["fp"], n_normal)
            entry["fpr_check"] = {"p_value": check.p_value, "outside": bool(check.outside),
                                  "predicted_range": list(check.predicted_range),
                                  "message": check.message()}
        metrics["operating_points"][name] = entry
    rows = []
    if classes is None:
        classes = y_true
        class_names = ("normal", "anomaly")
    classes = np.asarray(classes)
    for c in np.unique(classes):
        mask = classes == c
        role = "anomaly" if y_true[mask].mean() > 0.5 else "normal"
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        row = {"class": int(c), "name": name, "role": role, "n": int(mask.sum()),
               "mean_score": float(scores[mask].mean())}
        for op_name in calibration.operating_points:
            row[f"flagged@{op_name}"] = float(np.mean(calibration.decide(scores[mask], op_name)))
        rows.append(row)
    return Evaluation(metrics, pd.DataFrame(rows))


def add_pixel_metrics(ev: Evaluation, error_maps: np.ndarray, masks: np.ndarray,
                      has_mask: np.ndarray | None = None,
                      classes: np.ndarray | None = None) -> Evaluation:
    """Add pixel-level metrics (:func:`anomaly.localization.pixel_metrics`) to ``ev``.

    ``error_maps`` ``(N, H, W[, C])`` and ``masks`` ``(N, H, W)`` are the test images' per-pixel
    errors and ground truth; ``has_mask`` ``(N,)`` leaves out images without a mask. The
    metrics go to ``ev.metrics["pixel"]``; with ``classes`` ``(N,)`` each anomaly class of the
    per-class table also gets its ``pixel_auroc`` and ``pro``, measured on its own images plus
    the normal ones.
    """
    from anomaly.localization import pixel_metrics

    ev.metrics["pixel"] = pixel_metrics(error_maps, masks, has_mask)
    if classes is None or ev.per_class.empty:
        return ev
    classes = np.asarray(classes)
    keep = np.ones(len(classes), bool) if has_mask is None else np.asarray(has_mask, bool)
    normal_classes = ev.per_class.loc[ev.per_class["role"] == "normal", "class"].to_numpy()
    is_normal = np.isin(classes, normal_classes)
    aurocs, pros = [], []
    for _, row in ev.per_class.iterrows():
        if row["role"] != "anomaly":
            aurocs.append(None)
            pros.append(None)
            continue
        sel = (is_normal | (classes == row["class"])) & keep
        m = pixel_metrics(error_maps[sel], masks[sel]) if sel.any() else {}
        aurocs.append(m.get("pixel_auroc"))
        pros.append(m.get("pro"))
    ev.per_class["pixel_auroc"] = aurocs
    ev.per_class["pro"] = pros
    return ev


def format_report(ev: Evaluation) -> str:
    """A readable text table of an evaluation, for the end of ``anomaly fit``."""
    m = ev.metrics
    lines = []
    if m["auroc"] is not None:
        lines.append(f"AUROC {m['auroc']:.4f}   average precision {m['average_precision']:.4f}"
                     f"   ({m['n_test']} test images, {m['n_anomalies']} anomalies)")
    header = f"{'operating point':<16}{'threshold':>12}{'precision':>11}{'recall':>9}{'F1':>8}" \
             f"{'FPR':>8}   {'expected FPR (95%, n ref)':<27}tn/fp/fn/tp"
    lines += ["", header, "-" * len(header)]
    warnings = []
    for name, p in m["operating_points"].items():
        star = "*" if name == m["default_operating_point"] else " "
        lo, hi = p.get("fpr_interval") or (None, None)
        expected = (f"{p['expected_fpr']:.2%} ({lo:.2%}-{hi:.2%}, {p['n_reference']})"
                    if lo is not None else f"{p['expected_fpr']:.2%}")
        lines.append(f"{name + star:<16}{p['threshold']:>12.5g}{p['precision']:>11.3f}"
                     f"{p['recall']:>9.3f}{p['f1']:>8.3f}{p['fpr']:>8.3f}   {expected:<27}"
                     f"{p['tn']}/{p['fp']}/{p['fn']}/{p['tp']}")
        check = p.get("fpr_check")
        if check and check["outside"]:
            warnings.append(f"warning: {check['message']}: the data drifted from the reference "
                            "images, or there were too few of them")
    lines.append("(* default operating point; anomalous when score > threshold)")
    px = m.get("pixel")
    if px:
        def _f(v):
            return "n/a" if v is None else f"{v:.4f}"
        lines.append(f"pixel AUROC {_f(px['pixel_auroc'])}   PRO (FPR <= "
                     f"{px['pro_fpr_limit']:.0%}) {_f(px['pro'])}   ({px['n_images']} images "
                     f"with masks, {px['n_regions']} defect regions)")
        if px["n_images_without_mask"]:
            lines.append(f"note: {px['n_images_without_mask']} anomalous image(s) without a "
                         "mask: counted in the image metrics, left out of the pixel metrics")
    lines += warnings
    df = ev.per_class.copy()
    default_col = f"flagged@{m['default_operating_point']}"
    extra_cols = [c for c in ("pixel_auroc", "pro") if c in df.columns]
    table = df[["class", "name", "role", "n", "mean_score", default_col, *extra_cols]].rename(
        columns={default_col: f"flagged ({m['default_operating_point']})"})
    lines += ["", "Per class (detection rate for anomalies, false alarms for normal):",
              table.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    return "\n".join(lines)
