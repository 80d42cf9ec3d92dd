"""Do the operating points keep their promise on new data? Measured per class, per rule.

    flock /tmp/anomaly-train.lock python bench/calibration_bench.py --dataset mnist \
        [--classes 0-9] [--seed 0] [--val-fraction F] [--output bench/results]

For each class: trains the default detector on the class (the one-class protocol), then, from
the same scores, calibrates ``fpr@1%`` and ``fpr@5%`` with every rule and reference set below
and measures the FPR each threshold reaches on the test split's normal images:

- ``holdout/<rule>``: the normal hold-out alone (what ``anomaly fit`` does), for the rules
  ``smooth``, ``conformal`` and ``pac``;
- ``pooled/smooth``: the hold-out pooled with every normal training image, whose scores are
  optimistic (the model was fitted on them; their kNN part is leave-one-out), shifted by the
  optimism measured between the two (``estimate_optimism``).
- ``jittered/smooth``: the hold-out pooled with one stroke-jittered copy of each hold-out image
  (``--jitter``, the training augmentation's blend toward a 3x3 dilation or erosion), a
  reference that has seen the pen widths new writers bring (MNIST's test writers differ from
  its training writers by about 10% in ink; ``bench/calibration_shift.py``). Measured on MNIST
  (2026-12-03, seed 0) it lowers the thresholds instead (1.42x at 1%): a detector trained with
  stroke jitter scores jittered copies lower than clean ones.

Prints, per variant and target, the mean FPR over classes (its ratio to the target: the issue's
band is +-20%), the per-class range (band 0.33x-2x) and the per-class z-scores; writes the table
as CSV and markdown. Training is the expensive part: one model per class, every variant reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.benchmark import fpr_z
from anomaly.calibration import calibrate, estimate_optimism, fpr_name
from anomaly.config import resolve
from anomaly.data.prepare import prepare
from anomaly.data.splits import parse_classes
from anomaly.utils import atomic_write_bytes, atomic_write_text

TARGETS = (0.01, 0.05)


def jittered_scores(det, x_val, amount: float, seed: int) -> np.ndarray:
    """``(n,)`` scores of one stroke-jittered copy of each hold-out image ``(n, H, W, C)``."""
    import keras

    from anomaly.data import to_unit_float
    from anomaly.models.transforms import stroke_jitter

    x = to_unit_float(x_val, shape=det.image_shape_).reshape((-1, *det.image_shape_))
    gen = keras.random.SeedGenerator(seed)
    out = [keras.ops.convert_to_numpy(stroke_jitter(keras.ops.convert_to_tensor(x[i:i + 1024]),
                                                    amount, gen))
           for i in range(0, len(x), 1024)]
    return det.decision_function(np.concatenate(out))


def variants(val: np.ndarray, train: np.ndarray,
             jittered: np.ndarray | None = None) -> dict[str, object]:
    """Name -> Calibration, all from the same model's scores."""
    out = {f"holdout/{rule}": calibrate(val, target_fprs=TARGETS, rule=rule, force=True)
           for rule in ("smooth", "conformal", "pac")}
    shift = estimate_optimism(train, val)
    out["pooled/smooth"] = calibrate({"holdout": val, "train": train}, target_fprs=TARGETS,
                                     rule="smooth", optimism={"holdout": 0.0, "train": shift},
                                     force=True)
    if jittered is not None:
        out["jittered/smooth"] = calibrate({"holdout": val, "jittered": jittered},
                                           target_fprs=TARGETS, rule="smooth", force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--classes", default="0-9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, help="the normal hold-out's share of the "
                    "training images (default: the config's); more reference images, fewer "
                    "to train on")
    ap.add_argument("--jitter", type=float, default=0.25, help="stroke-jitter amount of the "
                    "jittered/smooth variant's copies (0: no such variant)")
    ap.add_argument("--output", default="bench/results")
    ap.add_argument("--keep-scores", metavar="DIR", help="also save each class's reference, "
                    "training and test scores (.npz) here, to try other rules offline")
    args = ap.parse_args()
    if not 0 <= args.jitter < 1:
        ap.error(f"Expected --jitter in [0, 1). Received: {args.jitter}")
    from anomaly.detector import Detector

    rows = []
    for c in parse_classes(args.classes, n_classes=10, leave_anomalies=False):
        cfg = resolve(f"configs/{args.dataset}.yaml", {"normal_classes": [c], "seed": args.seed,
                                                        "val_fraction": args.val_fraction})
        split = prepare(cfg)
        t = time.perf_counter()
        det = Detector.from_config(dataclasses.replace(cfg.detector, force_calibration=True))
        det.fit(split.x_train, x_val=split.x_val)
        fit_s = time.perf_counter() - t
        val = det.calibration_.reference_scores
        train = det.decision_scores_
        from sklearn.metrics import roc_auc_score

        scores = det.decision_function(split.x_test)
        auroc = float(roc_auc_score(split.y_test, scores))
        test = scores[split.y_test == 0]
        jit = (jittered_scores(det, split.x_val, args.jitter, args.seed)
               if args.jitter > 0 else None)
        if args.keep_scores:
            extra = {} if jit is None else {"jittered": jit}
            buf = io.BytesIO()
            np.savez(buf, val=val, train=train, test_normal=test, test=scores, y=split.y_test,
                     **extra)
            # Creates the folder; a crash mid-write leaves no half-written npz behind.
            atomic_write_bytes(Path(args.keep_scores) / f"{args.dataset}-{c}-seed{args.seed}.npz",
                               buf.getvalue())
        for name, cal in variants(val, train, jit).items():
            for fpr in TARGETS:
                op = cal.get(fpr_name(fpr))
                measured = float(cal.decide(test, op.name).mean())
                rows.append({"class": c, "variant": name, "target": fpr, "fpr": measured,
                             "z": fpr_z(measured, fpr, len(test)),
                             "expected": op.expected_fpr, "n_reference": op.n_reference,
                             "auroc": auroc, "fit_s": fit_s})
        print(f"class {c} (AUROC {auroc:.4f}, fit {fit_s:.0f} s): " + ", ".join(
            f"{r['variant']} {100 * r['fpr']:.2f}%" for r in rows if r["target"] == 0.01 and r["class"] == c),
            flush=True)
    df = pd.DataFrame(rows)
    vf = cfg.detector.val_fraction
    lines = [f"### {args.dataset}: FPR on the test normals per calibration (seed {args.seed}, "
             f"val_fraction {vf:g}, {df['n_reference'].median():.0f} reference images per "
             f"class; mean AUROC {df.groupby('class')['auroc'].first().mean():.4f})",
             "", "| variant | target | mean FPR (x target) | classes (x target) | per-class z |",
             "|---|---|---|---|---|"]
    for (name, fpr), g in df.groupby(["variant", "target"], sort=False):
        lines.append(f"| {name} | {100 * fpr:g}% | {100 * g['fpr'].mean():.2f}% "
                     f"({g['fpr'].mean() / fpr:.2f}x) | {100 * g['fpr'].min():.2f}-"
                     f"{100 * g['fpr'].max():.2f}% ({g['fpr'].min() / fpr:.2f}x-"
                     f"{g['fpr'].max() / fpr:.2f}x) | "
                     + " ".join(f"{z:+.1f}" for z in g["z"]) + " |")
    md = "\n".join(lines) + "\n"
    out = Path(args.output)
    stem = f"calibration-{args.dataset}-seed{args.seed}" + (
        f"-val{vf:g}" if args.val_fraction is not None else "")
    atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False, float_format="%.5f"))
    atomic_write_text(out / f"{stem}.md", md)
    print(md)


if __name__ == "__main__":
    main()
