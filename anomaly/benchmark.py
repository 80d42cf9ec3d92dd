"""The standard one-class protocol: train on one class, test on the whole test split.

For each class c and seed: the training split's images of class c (minus the normal hold-out,
``val_fraction`` of them) train the detector, and all test images are scored, with class c as normal and the
other classes as anomalies. Per class and seed the table holds AUROC and AP, the false-positive
rate that each ``fpr@P%`` operating point reaches on the test split's normal images (with its
z-score against the target: how many binomial standard errors it lies off), fit time and
scoring speed. Over seeds it gives each class's mean and standard deviation and the spread of
the class-mean across seeds. ``--baselines`` adds scikit-learn baselines on the same split: PCA
reconstruction error (32 components) and IsolationForest on raw pixels.
"""

from __future__ import annotations

import dataclasses
import os
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
from anomaly.data.stream import DiskImages
from anomaly.pipeline import log
from anomaly.utils import atomic_write_text

#: Mean AUROC over the 10 classes reported for the same protocol, trained from scratch.
PUBLISHED = {
    "mnist": {"OCGAN": 0.975, "LSA": 0.975, "MemAE": 0.975, "GEOM": 0.980, "ARNet": 0.983,
              "ESAD": 0.985},
    "fashion-mnist": {"GEOM": 0.935, "ARNet": 0.939, "ESAD": 0.940, "GOAD": 0.941},
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


def fpr_z(measured: float, target: float, n: int) -> float:
    """How many binomial standard errors a measured FPR lies from its target."""
    return (measured - target) / np.sqrt(target * (1 - target) / n)


def fit_one_class(cfg: RunConfig, c: int, seed: int):
    """One run of the protocol: class ``c`` normal, ``seed`` for the split and the detector.

    Returns:
        ``(split, fitted detector, seconds of Detector.fit)``.
    """
    from anomaly.detector import Detector

    run = dataclasses.replace(cfg, normal_classes=[c],
                              detector=dataclasses.replace(cfg.detector, seed=seed))
    split = prepare(run)
    t = time.perf_counter()
    det = Detector.from_config(run.detector).fit(split.x_train, x_val=split.x_val)
    return split, det, time.perf_counter() - t


def run_benchmark(cfg: RunConfig, *, classes: str = "0-9", seeds: tuple[int, ...] = (0,),
                  baselines: bool = False, output: str | Path = "bench/results",
                  tag: str | None = None) -> pd.DataFrame:
    """Run the protocol for each class and seed; write CSV + markdown into ``output``.

    Returns:
        One row per class and seed: ``class``, ``name``, ``seed``, ``auroc``, ``ap``, per
        operating point ``fpr@P%`` (measured on the test normals) and ``z@P%``, ``fit_s``,
        ``score_per_s``, ``epochs``, ``precision`` (the training arithmetic), and
        ``pca_auroc``/``iforest_auroc`` with ``baselines``.
    """
    from anomaly.progress import progress

    todo = parse_classes(classes, n_classes=10, leave_anomalies=False)
    rows: list[dict] = []
    md, df = "", pd.DataFrame()
    with progress("Benchmark", total=len(todo) * len(seeds), unit="runs") as bar:
        for c, seed in ((c, seed) for c in todo for seed in seeds):
            split, det, fit_s = fit_one_class(cfg, c, seed)
            det.decision_function(split.x_test[:256])  # warm-up: graphs are traced once
            t = time.perf_counter()
            scores = det.decision_function(split.x_test)
            score_s = time.perf_counter() - t
            normal = split.y_test == 0
            row = {"class": c, "name": split.class_names[c] if split.class_names else str(c),
                   "seed": seed, "auroc": roc_auc_score(split.y_test, scores),
                   "ap": average_precision_score(split.y_test, scores)}
            for name, op in det.calibration_.operating_points.items():
                if op.target_fpr is None:
                    continue
                measured = float(det.calibration_.decide(scores[normal], name).mean())
                row[name] = measured
                row[name.replace("fpr@", "z@")] = fpr_z(measured, op.target_fpr,
                                                        int(normal.sum()))
            row.update({"fit_s": fit_s, "score_per_s": len(scores) / score_s,
                        "epochs": len(det.history_.get("loss", [])),
                        "precision": det.precision_})
            if baselines:
                # PCA and the isolation forest fit on the whole matrix: a streamed training
                # set is read into memory for them.
                x_train = (split.x_train.load() if isinstance(split.x_train, DiskImages)
                           else split.x_train)
                for name, fn in (("pca", pca_scores), ("iforest", iforest_scores)):
                    row[f"{name}_auroc"] = roc_auc_score(split.y_test,
                                                         fn(x_train, split.x_test))
            rows.append(row)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))
            # After every run: a benchmark of hours that stops keeps what it measured.
            df = pd.DataFrame(rows)
            md = _write(df, cfg, output, tag)
            bar.update()
    print(md)
    return df


def _write(df: pd.DataFrame, cfg: RunConfig, output: str | Path, tag: str | None) -> str:
    """Write ``STEM.csv`` and ``STEM.md`` atomically; returns the markdown. The stem is
    ``tag``, else ``DATASET-MODEL`` (plus ``-PRESET`` for a preset other than ``fast``)."""
    out = Path(output)
    preset = f"-{cfg.preset}" if cfg.preset not in (None, "fast") else ""
    stem = tag or f"{Path(cfg.dataset).name}-{cfg.detector.model}{preset}"
    atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False, float_format="%.5f"))
    md = markdown(df, cfg)
    atomic_write_text(out / f"{stem}.md", md)
    return md


def _precisions(df: pd.DataFrame) -> str:
    """The arithmetic the runs trained in (the ``precision`` column; runs recorded before it
    existed trained in float32)."""
    if "precision" not in df:
        return "float32"
    return "/".join(sorted(df["precision"].fillna("float32").astype(str).unique()))


def markdown(df: pd.DataFrame, cfg: RunConfig) -> str:
    """Per class: mean ± std over seeds; then the class-mean, its spread over seeds, the worst
    class and the operating points' FPRs against their targets."""
    seeds = sorted(df["seed"].unique())
    metric_cols = ["auroc", "ap"] + [c for c in df.columns if c.endswith("_auroc")]
    fpr_cols = [c for c in df.columns if c.startswith("fpr@")]
    per = df.groupby(["class", "name"], sort=True)
    lines = [f"### {cfg.dataset}, {cfg.detector.model}, score {cfg.detector.score} "
             f"(one-class protocol, {df['class'].nunique()} classes, seeds "
             f"{', '.join(map(str, seeds))})", "",
             "| class | name | " + " | ".join(metric_cols) + " | "
             + " | ".join(f"FPR {c[4:]} (z)" for c in fpr_cols) + " | epochs | fit s |",
             "|" + "---|" * (4 + len(metric_cols) + len(fpr_cols))]

    def pm(series) -> str:
        return (f"{series.mean():.4f} ± {series.std(ddof=0):.4f}" if len(series) > 1
                else f"{series.mean():.4f}")

    for (c, name), g in per:
        cells = [str(c), str(name)] + [pm(g[m]) for m in metric_cols]
        cells += [f"{100 * g[f].mean():.2f}% ({g[f.replace('fpr@', 'z@')].mean():+.1f})"
                  for f in fpr_cols]
        cells += [f"{g['epochs'].mean():.0f}", f"{g['fit_s'].median():.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # A seed run on some classes only (the accurate preset's extra seeds on the hardest
    # classes) counts in its classes' rows, not in the class-mean: that would mix classes.
    n_classes = df["class"].nunique()
    covered = df.groupby("seed")["class"].nunique()
    complete = [s for s in seeds if covered[s] == n_classes]
    full = df[df["seed"].isin(complete)] if complete else df
    means = full.groupby("seed")["auroc"].mean()
    class_means = per["auroc"].mean()
    cells = ["**mean**", ""] + [f"**{full.groupby('seed')[m].mean().mean():.4f}**"
                               for m in metric_cols]
    cells += [f"**{100 * full[f].mean():.2f}%**" for f in fpr_cols]
    cells += [f"{full['epochs'].mean():.0f}", f"{full['fit_s'].median():.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
    spread = (f"std of the {n_classes}-class mean across seeds {means.std(ddof=0):.4f} (per "
              "seed: " + ", ".join(f"{s}: {v:.4f}" for s, v in means.items()) + ")"
              if len(means) > 1 else f"seed {means.index[0]} (one seed: no spread)")
    lines += ["", f"Mean AUROC {means.mean():.4f}; {spread}; worst class "
              f"{class_means.idxmin()[1]} {class_means.min():.4f}."]
    partial = [s for s in seeds if s not in complete]
    if partial and complete:
        lines.append(", ".join(
            f"seed {s} ran on class(es) "
            + ", ".join(map(str, sorted(df.loc[df['seed'] == s, 'class']))) for s in partial)
            + f": in those classes' rows (mean ± std over the seeds each has), not in the "
            f"class-mean, which is over seeds {', '.join(map(str, complete))}.")
    for f in fpr_cols:
        target = float(f[4:-1]) / 100
        per_class = full.groupby("class")[f].mean()
        lines.append(f"{f}: mean FPR on the test normals {100 * full[f].mean():.2f}% "
                     f"({full[f].mean() / target:.2f}x the target); classes "
                     f"{100 * per_class.min():.2f}-{100 * per_class.max():.2f}% "
                     f"({per_class.min() / target:.2f}x-{per_class.max() / target:.2f}x).")
    pub = PUBLISHED.get(cfg.dataset)
    if pub:
        lines += ["", "Published mean AUROC, same protocol, trained from scratch: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pub.items())]
    d = cfg.detector
    lines += ["", f"Scoring speed (in-process, whole test split): median "
              f"{df['score_per_s'].median():,.0f} images/s. Settings: epochs={d.epochs}, "
              f"batch_size={d.batch_size}, latent_dim={d.latent_dim}, hidden={d.hidden}, "
              f"score={d.score}, aggregation={d.aggregation}, calibration="
              f"{d.calibration_rule}, training precision={_precisions(df)}; machine: "
              f"{platform.machine()}, {os.cpu_count()} CPUs."]
    return "\n".join(lines) + "\n"
