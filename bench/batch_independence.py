"""Does an image score the same alone as in a batch, with onnxruntime? (the export's docstring)

    python bench/batch_independence.py --artifact models/mnist-0-conv-vae/VERSION [--n 512]

Scores the first ``--n`` MNIST test images in one batch with the artifact's ONNX export, then
every fourth of them alone, and prints the largest differences of the score parts (relative)
and of the combined score (absolute and relative; the z-score sum can be near 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.data.builtin import load_dataset
from anomaly.runtime import load_runtime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, type=Path, help="an artifact NAME/VERSION")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n", type=int, default=512, help="images in the batch")
    args = ap.parse_args()
    rt = load_runtime(args.artifact, runtime="onnx")
    x = load_dataset(args.dataset).x_test[: args.n]
    batch = rt.detect(x)
    picks = range(0, len(x), 4)
    alone = [rt.detect(x[i : i + 1]) for i in picks]
    scores = np.concatenate([a.scores for a in alone])
    parts = np.concatenate([a.parts for a in alone])
    want_s, want_p = batch.scores[::4], batch.parts[::4]
    abs_s = np.abs(scores - want_s)
    print(f"{len(alone)} images alone vs in a batch of {len(x)} ({args.artifact}):")
    print("  parts, max relative: " + ", ".join(
        f"{v:.2g}" for v in (np.abs(parts - want_p) / np.abs(want_p)).max(axis=0)))
    print(f"  score, max absolute {abs_s.max():.2g}, max relative "
          f"{(abs_s / np.maximum(np.abs(want_s), 1e-12)).max():.2g} (median |score| "
          f"{np.median(np.abs(batch.scores)):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
