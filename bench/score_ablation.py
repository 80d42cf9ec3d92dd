"""What each anomaly score is worth: one model trained per class, scored several ways.

    python bench/score_ablation.py --dataset mnist --model conv-vae --classes 2,3 --epochs 20

For each normal class, trains one detector (one-class protocol, as ``anomaly benchmark``) and
prints the test AUROC of: reconstruction MSE (mean and top10 aggregation), the raw Bernoulli
cross-entropy and raw negative ELBO (cross-entropy not corrected for the image's own entropy),
their entropy-corrected versions (this project's ``bce`` and ``elbo``), the latent kNN distance
alone, and ``mse+knn``. Prints a markdown table of the results.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from anomaly.config import resolve
from anomaly.data.prepare import prepare
from anomaly.data.splits import parse_classes


def _raw_bce(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed raw cross-entropy ``(N,)`` and KL ``(N,)`` at the posterior mean."""
    from keras import ops

    bce, kl = [], []
    for i in range(0, len(x), 1024):
        xb = x[i : i + 1024][..., None]  # (n, H, W, 1): what the network takes
        z_mean, z_log_var = model.encode(xb)
        lg = model.decode_logits(z_mean)
        pix = ops.relu(lg) - lg * xb + ops.log1p(ops.exp(-ops.abs(lg)))
        bce.append(ops.convert_to_numpy(ops.sum(pix, axis=(1, 2, 3))))
        kl.append(ops.convert_to_numpy(model.kl_divergence(z_mean, z_log_var))
                  if model.variational else np.zeros(len(xb)))
    return np.concatenate(bce), np.concatenate(kl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="conv-vae")
    ap.add_argument("--classes", default="2,3")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    from anomaly.detector import Detector
    from anomaly.scoring import Scorer

    rows = []
    for c in parse_classes(args.classes, n_classes=10, leave_anomalies=False):
        cfg = resolve(None, {"dataset": args.dataset, "normal_classes": [c],
                             "model": args.model, "epochs": args.epochs,
                             "force_calibration": True})
        split = prepare(cfg)
        det = Detector.from_config(cfg.detector).fit(split.x_train, x_val=split.x_val)
        x, y = split.x_test, split.y_test
        model = det.model_
        row = {"class": c}
        for score, agg in (("mse", "mean"), ("mse", "top10"), ("bce", "mean")):
            row[f"{score} ({agg})"] = roc_auc_score(y, Scorer(model, score, agg)(x).scores)
        raw_bce, kl = _raw_bce(model, x)
        row["raw bce (sum)"] = roc_auc_score(y, raw_bce)
        if model.variational:
            row["raw elbo"] = roc_auc_score(y, raw_bce + model.beta * kl)
            row["elbo"] = roc_auc_score(y, Scorer(model, "elbo")(x).scores)
        parts = det.scorer.parts(x)  # log mse, log knn
        row["latent knn alone"] = roc_auc_score(y, parts[:, 1])
        row[f"mse+knn ({det.aggregation})"] = roc_auc_score(y, det.decision_function(x))
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    df = pd.DataFrame(rows)
    print(f"\n{args.dataset}, {args.model}, {args.epochs} epochs: test AUROC per score\n")
    cols = list(df.columns)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in df.iterrows():
        print("| " + " | ".join(f"{r[k]:.4f}" if k != "class" else str(int(r[k]))
                                for k in cols) + " |")


if __name__ == "__main__":
    main()
