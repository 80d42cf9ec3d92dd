"""What a detector cannot see: near-empty images, scored like the README says.

    anomaly fit --normal-class 0 --output models
    python bench/blind_spot.py models/mnist-0-conv-vae

Scores an all-black image, an all-white one and a faint speck with the artifact (a model folder
means its newest version) and prints each one's score, normalized score, surprise (-log10 p)
and decision at the default operating point, next to the median normal test image's, as the
markdown lines the README quotes.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    args = ap.parse_args()
    from anomaly.data.builtin import load_dataset
    from anomaly.detector import Detector

    det = Detector.load(args.artifact)
    h, w, c = det.image_shape_
    shape = (h, w) if c == 1 else (h, w, c)
    speck = np.zeros(shape, np.float32)
    speck[h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1] = 0.3
    probes = {"all-black image": np.zeros(shape, np.float32),
              "all-white image": np.ones(shape, np.float32),
              "faint 2x2 speck on black": speck}
    names = list(probes)
    out = det.detect(np.stack([probes[n] for n in names]))
    meta = det.metadata_
    if meta.get("dataset") in ("mnist", "fashion-mnist"):
        ds = load_dataset(meta["dataset"])
        normal = ds.x_test[np.isin(ds.y_test, meta.get("normal_classes") or [0])]
        scores = det.decision_function(normal)
        i = int(np.argsort(scores)[len(scores) // 2])
        ref = det.detect(normal[i : i + 1])
        names.append("median normal test image")
        for k in ("scores", "normalized", "surprise", "is_anomaly"):
            setattr(out, k, np.r_[getattr(out, k), getattr(ref, k)])
    print(f"{det.path_} at {out.operating_point} (threshold {out.threshold:.4g}):\n")
    print("| image | score | normalized | surprise | flagged |\n|---|---|---|---|---|")
    for j, name in enumerate(names):
        print(f"| {name} | {out.scores[j]:.3f} | {out.normalized[j]:.3f} | "
              f"{out.surprise[j]:.2f} | {'yes' if out.is_anomaly[j] else 'no'} |")


if __name__ == "__main__":
    main()
