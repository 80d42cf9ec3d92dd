"""Per-epoch wall and CPU time of the default fit: with and without tf.data's autotuner, or
in float32 and in bfloat16.

    flock /tmp/anomaly-train.lock python bench/epoch_timing.py [--epochs 12] [--class 0]
        [--compare autotune|precision] [--preset fast|accurate]

Trains the detector of configs/mnist.yaml (with ``--preset``'s values) on one MNIST class
twice, each in a fresh process. ``--compare autotune`` (the default): as the project does
(autotune off, a fixed prefetch: ``anomaly.training``), and with tf.data's autotuner switched
back on; both in float32. ``--compare precision``: ``--precision float32`` against
``--precision bfloat16`` (autotune off both). Prints each epoch's wall seconds and the process's
CPU seconds in it, without the first epoch (graph tracing). An epoch whose wall time exceeds the
run's median by more than 0.5 s while its CPU time does not grow is a stall: the fit waited,
idle. These are the measurements behind ``image_dataset``'s comment, ``choose_precision``'s
docstring and the README's fit-time row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def one_run(epochs: int, normal_class: int, autotune: bool, precision: str,
            preset: str) -> list[tuple[float, float]]:
    """``(wall_s, cpu_s)`` of each epoch of one fit in this process."""
    import keras

    import anomaly.training as training
    from anomaly._tf import tf
    from anomaly.config import resolve
    from anomaly.data.prepare import prepare
    from anomaly.detector import Detector

    if autotune:
        project = training.image_dataset

        def with_autotune(*args, **kwargs):
            options = tf.data.Options()
            options.autotune.enabled = True
            return project(*args, **kwargs).with_options(options)

        training.image_dataset = with_autotune

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[tuple[float, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = (time.perf_counter(), _cpu())

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append((time.perf_counter() - self.start[0], _cpu() - self.start[1]))

    cfg = resolve(str(REPO / "configs" / "mnist.yaml"),
                  {"epochs": epochs, "normal_classes": [normal_class], "precision": precision,
                   "preset": preset})
    split = prepare(cfg)
    timer = Timer()
    Detector.from_config(cfg.detector).fit(split.x_train, x_val=split.x_val, verbose=0,
                                           callbacks=[timer])
    return timer.epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--class", dest="normal_class", type=int, default=0)
    ap.add_argument("--compare", choices=("autotune", "precision"), default="autotune")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        autotune, precision = args.child.split(",")
        print(json.dumps(one_run(args.epochs, args.normal_class, autotune == "on", precision,
                                 args.preset)))
        return 0
    import numpy as np

    modes = {"autotune": {"autotune off": "off,float32", "autotune on": "on,float32"},
             "precision": {"float32": "off,float32", "bfloat16": "off,bfloat16"}}[args.compare]
    for mode, child in modes.items():
        out = subprocess.run([sys.executable, __file__, "--child", child, "--epochs",
                              str(args.epochs), "--class", str(args.normal_class), "--preset",
                              args.preset], capture_output=True, text=True, check=True)
        epochs = np.array(json.loads(out.stdout.strip().splitlines()[-1]))[1:]  # 1st: tracing
        wall, cpu = epochs[:, 0], epochs[:, 1]
        stalls = wall > np.median(wall) + 0.5
        print(f"{mode} ({args.preset}): epochs 2-{args.epochs} wall " + " ".join(f"{w:.2f}" for w in wall))
        print("  cpu " + " ".join(f"{c:.2f}" for c in cpu))
        print(f"  median wall {np.median(wall):.2f} s, total {wall.sum():.1f} s; stalled epochs "
              f"{int(stalls.sum())} of {len(wall)} (their extra wall "
              f"{(wall[stalls] - np.median(wall)).sum():.1f} s, extra CPU "
              f"{(cpu[stalls] - np.median(cpu)).sum() if stalls.any() else 0.0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
