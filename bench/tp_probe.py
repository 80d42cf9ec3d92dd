"""The probe behind README "Benchmarks" ("What was tried on the way"): a transformation classifier
trained on its own, outside the detector, added to the default detector's mse+knn parts.

    flock /tmp/anomaly-train.lock python bench/tp_probe.py --dataset mnist --classes 8,2 \\
        --transforms r4      # the four rotations; r4f: the eight symmetries of the square

For each class (seed 0 by default): trains the default ``Detector`` and takes its raw parts on
the hold-out and the test split, then trains a small classifier (two 3x3 convs per stage,
16/32/64 filters, batch norm, max-pooling, global average pooling) for ``--epochs`` epochs on
every transform of every normal training image, and prints AUROCs: ``base`` (mse+knn),
``geom`` (the classifier's mean -log p(applied transform) alone), ``xent`` (cross-entropy to
the mean normal output of each transform, a simplified form of GEOM's Dirichlet score),
``sum3`` (mse+knn plus the z-scored log of ``geom``) and ``sum3x`` (the same with ``xent``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def transforms(name: str) -> list[tuple[int, int]]:
    """``(quarter turns, mirrored)`` of each transform of ``r4`` or ``r4f``."""
    return [(r, f) for f in ((0, 1) if name == "r4f" else (0,)) for r in range(4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--classes", default="8,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transforms", choices=("r4", "r4f"), default="r4")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()

    import keras
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    import anomaly._tf  # noqa: F401  (TensorFlow, quietly)
    from anomaly.config import RunConfig
    from anomaly.data.prepare import prepare
    from anomaly.detector import Detector

    ts = transforms(args.transforms)
    n_t = len(ts)

    def apply_all(x):  # (T, B, H, W, C)
        out = []
        for r, f in ts:
            y = tf.reverse(x, [2]) if f else x
            out.append(tf.image.rot90(y, r))
        return tf.stack(out)

    def run(c: int) -> None:
        cfg = RunConfig(dataset=args.dataset, normal_classes=[c])
        cfg.detector.seed = args.seed
        sp = prepare(cfg)
        det = Detector(seed=args.seed).fit(sp.x_train, x_val=sp.x_val)
        pv, pt = det.scorer.parts(sp.x_val), det.scorer.parts(sp.x_test)
        xtr, xv, xt = (x[..., None] if x.ndim == 3 else x
                       for x in (sp.x_train, sp.x_val, sp.x_test))
        shape = tuple(xtr.shape[1:])
        keras.utils.set_random_seed(args.seed)
        layers = keras.layers

        def block(h, f):
            h = layers.Conv2D(f, 3, padding="same", use_bias=False)(h)
            return layers.ReLU()(layers.BatchNormalization()(h))

        inp = keras.Input(shape)
        w = args.width
        h = layers.MaxPool2D()(block(block(inp, w), w))
        h = layers.MaxPool2D()(block(block(h, 2 * w), 2 * w))
        h = layers.GlobalAveragePooling2D()(block(h, 4 * w))
        net = keras.Model(inp, layers.Dense(n_t)(h))
        net.compile(keras.optimizers.Adam(1e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))

        def expand(xb):
            b = tf.shape(xb)[0]
            labels = tf.repeat(tf.range(n_t)[:, None], b, axis=1)
            return tf.reshape(apply_all(xb), (-1, *shape)), tf.reshape(labels, (-1,))

        data = (tf.data.Dataset.from_tensor_slices(xtr).shuffle(len(xtr), seed=args.seed)
                .batch(max(1, 256 // n_t)).map(expand).prefetch(2))
        t0 = time.perf_counter()
        net.fit(data, epochs=args.epochs, verbose=0)
        fit_s = time.perf_counter() - t0

        def log_probs(x, bs=512):  # (T, N, T)
            out = []
            for i in range(0, len(x), bs):
                xb = tf.constant(x[i : i + bs])
                lg = net(tf.reshape(apply_all(xb), (-1, *shape)), training=False)
                out.append(tf.nn.log_softmax(lg).numpy().reshape(n_t, len(xb), n_t))
            return np.concatenate(out, axis=1)

        mean_out = np.exp(log_probs(xtr)).mean(1)  # (T, T): normal output per transform

        def nlls(x):
            lp = log_probs(x)
            own = -np.mean([lp[k, :, k] for k in range(n_t)], axis=0)
            xent = -np.mean([(mean_out[k][None] * lp[k]).sum(1) for k in range(n_t)], axis=0)
            return own, xent

        (gt, ht), (gv, hv) = nlls(xt), nlls(xv)

        def z(p, ref):
            return (p - ref.mean(0)) / ref.std(0)

        y = sp.y_test
        zb = z(pt, pv).sum(1)
        res = {"base": roc_auc_score(y, zb), "geom": roc_auc_score(y, gt),
               "xent": roc_auc_score(y, ht),
               "sum3": roc_auc_score(y, zb + z(np.log(gt + 1e-6), np.log(gv + 1e-6))),
               "sum3x": roc_auc_score(y, zb + z(np.log(ht + 1e-6), np.log(hv + 1e-6)))}
        print(f"{args.dataset} class {c} seed {args.seed} {args.transforms} ({n_t} transforms, "
              f"{args.epochs} epochs, width {w}): classifier fit {fit_s:.0f} s; "
              + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)

    for c in (int(v) for v in args.classes.split(",")):
        run(c)


if __name__ == "__main__":
    main()
