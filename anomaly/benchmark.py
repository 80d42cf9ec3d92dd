"""The standard one-class protocol: train on one class, test on the whole test split.

For each class c: the training split's images of class c (minus the 10% normal hold-out) train
the detector, and all test images are scored, with class c as normal and the other nine as
anomalies. The result is a per-class AUROC/AP table, its mean, and times. ``--baselines`` adds
scikit-learn baselines on the same split: PCA reconstruction error (32 components) and
IsolationForest on raw pixels.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.config import RunConfig
from anomaly.data.prepare import prepare
from anomaly.data.splits import parse_classes
from anomaly.pipeline import log
from anomaly.utils import atomic_write_text

#: Mean AUROC over the 10 classes reported for the same protocol in the literature.
PUBLISHED = {
    "mnist": {"DCAE": 0.897, "VAE": 0.970, "Deep SVDD": 0.948, "OCGAN": 0.975, "GEOM": 0.980,
              "ARNet": 0.983},
    "fashion-mnist": {"GEOM": 0.935, "ARNet": 0.939},
}


def pca_scores(x_train: np.ndarray, x_test: np.ndarray, n_components: int = 32) -> np.ndarray:
    """PCA reconstruction error: images ``(n, H, W[, C])`` -> scores ``(n_test,)``."""
    a, b = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    pca = PCA(n_components=min(n_components, *a.shape), random_state=0).fit(a)
    rec = pca.inverse_transform(pca.transform(b))
    return ((b - rec) ** 2).mean(axis=1)


def iforest_scores(x_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """IsolationForest on raw pixels; sign flipped so higher = more anomalous."""
    forest = IsolationForest(n_estimators=100, random_state=seed, n_jobs=-1)
    forest.fit(x_train.reshape(len(x_train), -1))
    return -forest.score_samples(x_test.reshape(len(x_test), -1))


def run_benchmark(cfg: RunConfig, *, classes: str = "0-9", baselines: bool = False,
                  output: str | Path = "bench/results") -> pd.DataFrame:
    """Run the protocol for each class in ``classes``; write CSV + markdown into ``output``.

    Returns:
        One row per class: ``class``, ``auroc``, ``ap``, ``fit_s``, ``score_s``, ``epochs``,
        and ``pca_auroc``/``iforest_auroc`` with ``baselines``.
    """
    from anomaly.detector import Detector

    todo = parse_classes(classes, n_classes=10, leave_anomalies=False)
    rows = []
    for c in todo:
        run = dataclasses.replace(cfg, normal_classes=[c])
        split = prepare(run)
        t = time.perf_counter()
        det = Detector.from_config(run.detector).fit(split.x_train, x_val=split.x_val)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        scores = det.decision_function(split.x_test)
        score_s = time.perf_counter() - t
        row = {"class": c, "name": split.class_names[c] if split.class_names else str(c),
               "auroc": roc_auc_score(split.y_test, scores),
               "ap": average_precision_score(split.y_test, scores),
               "fit_s": fit_s, "score_s": score_s,
               "epochs": len(det.history_.get("loss", []))}
        if baselines:
            for name, fn in (("pca", pca_scores), ("iforest", iforest_scores)):
                s = fn(split.x_train, split.x_test)
                row[f"{name}_auroc"] = roc_auc_score(split.y_test, s)
        rows.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()))
    df = pd.DataFrame(rows)
    out = Path(output)
    stem = f"{Path(cfg.dataset).name}-{cfg.detector.model}"  # a data path: its name, inside output
    atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False, float_format="%.4f"))
    md = _markdown(df, cfg)
    atomic_write_text(out / f"{stem}.md", md)
    print(md)
    return df


def _markdown(df: pd.DataFrame, cfg: RunConfig) -> str:
    cols = ["class", "name", "auroc", "ap"] + [c for c in df.columns if c.endswith("_auroc")]
    cols += ["epochs", "fit_s"]
    table = df[cols].copy()
    mean = {c: table[c].mean() for c in cols if c not in ("class", "name")}
    d = cfg.detector
    lines = [f"### {cfg.dataset}, {d.model} (one-class protocol, {len(df)} classes)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    lines.append("| **mean** | | " + " | ".join(_fmt(mean[c]) for c in cols[2:]) + " |")
    pub = PUBLISHED.get(cfg.dataset)
    if pub:
        lines += ["", "Published mean AUROC, same protocol: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pub.items())]
    lines += ["", f"Settings: epochs={d.epochs}, batch_size={d.batch_size}, "
              f"latent_dim={d.latent_dim}, hidden={d.hidden}, score={d.score}, "
              f"seed={d.seed}; machine: {platform.machine()}, "
              f"{__import__('os').cpu_count()} CPUs."]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4f}" if v < 10 else f"{v:.1f}"
    return str(v)
