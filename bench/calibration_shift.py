"""Where MNIST's fpr@ promise breaks: which part of the score drifts, and on whose images.

    flock /tmp/anomaly-train.lock python bench/calibration_shift.py --dataset mnist \
        [--classes 0-9] [--seed 0] [--output bench/results]

MNIST's test split is two populations: its first 5,000 images come from NIST's Special
Database 3 (Census Bureau employees), the last 5,000 from Special Database 1 (high-school
students), each by writers the training split does not have (LeCun, Cortes and Burges, "The
MNIST database"). For each class the default detector is trained as in the benchmark (one
class, seeded hold-out), and the script prints:

- the FPR that ``fpr@1%`` and ``fpr@5%`` reach on the test normals, on all of them and on each
  half of the test split (``sd3``: index < 5,000; ``sd1``: the rest);
- for each raw part of the score (``log_mse``, ``log_knn``, ``log_tp``), the share of the test
  normals above the hold-out's 99th percentile of that part alone (1% if the part does not
  drift), so the part that carries a drift is named;
- with ``mse+knn+tp``: AUROC and the same FPRs for the score without its transformation part
  (the other parts' z-scores summed, standardized and calibrated on the same hold-out by the
  same rule), so what that part buys and what drift it brings are measured together.

The normal hold-out comes from the training split's writers, the test normals from others:
if only one half, or only one part, exceeds the target, the bias is a shift in the data that a
threshold drawn from the training writers cannot see, not a flaw of the threshold rule. For
other data sets the halves are just the first and the second half of the test split.
Writes the table as CSV and markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from anomaly.benchmark import fit_one_class
from anomaly.calibration import calibrate
from anomaly.config import resolve
from anomaly.data.splits import parse_classes
from anomaly.utils import atomic_write_text

#: Index of the first test image from NIST Special Database 1 in MNIST's test split.
SD1_START = 5000


def run_class(cfg, c: int, seed: int) -> dict:
    split, det, fit_s = fit_one_class(cfg, c, seed)
    normal = split.y_test == 0
    idx = np.flatnonzero(normal)
    first = idx < (SD1_START if cfg.dataset == "mnist" else len(split.y_test) // 2)
    sc = det.scorer
    val_parts, all_parts = sc.parts(split.x_val), sc.parts(split.x_test)
    test_parts = all_parts[normal]
    row = {"class": c, "seed": seed, "n_val": len(split.x_val), "n_test": int(normal.sum()),
           "n_sd3": int(first.sum()), "fit_s": fit_s,
           "auroc": roc_auc_score(split.y_test, sc.combine(all_parts))}
    _fprs(row, "", det.calibration_, sc.combine(test_parts), first)
    for i, part in enumerate(sc.part_names):
        q99 = np.quantile(val_parts[:, i], 0.99)
        row[f"{part}>q99"] = (test_parts[:, i] > q99).mean()
    if "log_tp" in sc.part_names:
        keep = [i for i, part in enumerate(sc.part_names) if part != "log_tp"]
        mean, std = val_parts[:, keep].mean(axis=0), val_parts[:, keep].std(axis=0)
        combine = lambda parts: ((parts[:, keep] - mean) / std).sum(axis=1)  # noqa: E731
        cal = calibrate(combine(val_parts), target_fprs=tuple(det.target_fprs),
                        rule=det.calibration_rule, force=True)
        row["no-tp auroc"] = roc_auc_score(split.y_test, combine(all_parts))
        _fprs(row, "no-tp ", cal, combine(test_parts), first)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
    return row


def _fprs(row: dict, prefix: str, calibration, scores: np.ndarray, first: np.ndarray) -> None:
    """Add the FPR of each fpr@ point on the test normals' ``scores`` ``(n,)``: all of them and
    each half (``first``: ``(n,)`` bool, the SD-3 half)."""
    for name, op in calibration.operating_points.items():
        if op.target_fpr is None:
            continue
        flagged = scores > op.threshold
        row[f"{prefix}{name}"] = flagged.mean()
        row[f"{prefix}{name} sd3"] = flagged[first].mean()
        row[f"{prefix}{name} sd1"] = flagged[~first].mean()


def markdown(df: pd.DataFrame, dataset: str, seed: int) -> str:
    aurocs = [c for c in df.columns if c.endswith("auroc")]
    pct = [c for c in df.columns if "fpr@" in c or c.endswith(">q99")]
    halves = ("SD-3 (test index < 5,000) / SD-1" if dataset == "mnist"
              else "first / second half of the test split")
    lines = [f"### {dataset}: FPR on the test normals by test-split half, and which score "
             f"part drifts (default detector, seed {seed})", "",
             f"Halves: {halves}. `PART>q99`: share of the test normals above the hold-out's "
             "99th percentile of that part alone (1.00% without drift). `no-tp`: the score "
             "without its transformation part, calibrated on the same hold-out by the same "
             "rule.", "",
             "| class | n val / test / sd3 | " + " | ".join(aurocs + pct) + " |",
             "|---|---|" + "---|" * (len(aurocs) + len(pct))]
    for _, r in df.iterrows():
        lines.append(f"| {int(r['class'])} | {int(r.n_val)} / {int(r.n_test)} / "
                     f"{int(r.n_sd3)} | " + " | ".join([f"{r[c]:.4f}" for c in aurocs]
                                                       + [f"{100 * r[c]:.2f}%" for c in pct])
                     + " |")
    lines.append("| **mean** | | " + " | ".join([f"**{df[c].mean():.4f}**" for c in aurocs]
                                               + [f"**{100 * df[c].mean():.2f}%**"
                                                  for c in pct]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--config", help="config file (default: configs/DATASET.yaml)")
    ap.add_argument("--classes", default="0-9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="bench/results")
    args = ap.parse_args()
    cfg = resolve(args.config or f"configs/{args.dataset}.yaml")
    rows = []
    stem = f"calibration-shift-{args.dataset}-seed{args.seed}"
    out = Path(args.output)
    for c in parse_classes(args.classes, n_classes=10, leave_anomalies=False):
        rows.append(run_class(cfg, c, args.seed))
        df = pd.DataFrame(rows)
        md = markdown(df, cfg.dataset, args.seed)
        atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False, float_format="%.5f"))
        atomic_write_text(out / f"{stem}.md", md)
    print(md)


if __name__ == "__main__":
    main()
