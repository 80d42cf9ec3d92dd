"""Do images stored next to each other resemble each other? The evidence behind ``holdout_run``.

    python bench/holdout_locality.py [--datasets mnist,fashion-mnist] [--queries 1000]

For each class of a data set's training split: takes ``--queries`` seeded images, finds each
one's nearest neighbour (pixel L2) among the class's other training images and measures how
far apart the two are stored (places in the training file). Where a file keeps a writer's or a
batch's images together, nearest neighbours are stored close together far more often than
random pairs are; there a hold-out of single images shares its writers with the training
images (and its thresholds promise too little), and one of runs of consecutive images does not.
Prints, per data set, the share of nearest neighbours (and of random pairs) stored within 50,
200 and 1,000 places, and writes the table as markdown.

With ``--draws N`` it also measures how typical each class's hold-out is (the mean distance
of its images to their 5 nearest other training images of the class) for seeds 0-2 and over N
seeded draws, for single images and for runs (``--run``): where the file order is random the
two rules draw alike, and a class whose seeds 0-2 drew unusually typical hold-outs gets lower
thresholds (more false positives) by luck, not by rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from anomaly.data.builtin import load_dataset
from anomaly.data.splits import holdout
from anomaly.utils import atomic_write_text

GAPS = (50, 200, 1000)


def squared_distances(a: np.ndarray, x: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """``(len(a), n)`` squared L2 distances of rows ``a`` to images ``x`` ``(n, D)``; ``sq``
    holds the squared norms of ``x``'s rows (computed once per class by the callers)."""
    return (a ** 2).sum(1)[:, None] + sq[None] - 2 * a @ x.T


def neighbour_gaps(x: np.ndarray, places: np.ndarray, queries: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Storage distance to the nearest neighbour and to a random image, per query.

    Args:
        x: ``(n, D)`` float32 images of one class, flattened.
        places: ``(n,)`` their places in the training file.
        queries: how many images to ask about (at most ``n``).

    Returns:
        ``(nearest, random)``, each ``(queries,)`` absolute differences of places.
    """
    q = rng.choice(len(x), min(queries, len(x)), replace=False)
    d = squared_distances(x[q], x, (x ** 2).sum(1))
    d[np.arange(len(q)), q] = np.inf  # not itself
    other = rng.integers(0, len(x) - 1, len(q))
    other += other >= q  # a random image other than itself
    return np.abs(places[d.argmin(1)] - places[q]), np.abs(places[other] - places[q])


def knn_distance(x: np.ndarray, k: int = 5, block: int = 1000) -> np.ndarray:
    """``(n,)`` mean squared L2 distance of each image ``(n, D)`` to its ``k`` nearest others."""
    sq = (x ** 2).sum(1)
    out = np.empty(len(x))
    for i in range(0, len(x), block):
        d = squared_distances(x[i:i + block], x, sq)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf
        out[i:i + block] = np.partition(d, k, axis=1)[:, :k].mean(1)
    return out


def holdout_typicality(dist: np.ndarray, fraction: float, run: int,
                       draws: int) -> tuple[np.ndarray, float, float]:
    """Hold-outs' mean ``dist`` for seeds 0-2, and its mean and std over ``draws`` seeds."""
    means = np.array([dist[holdout(len(dist), fraction, s, run)[1]].mean()
                      for s in range(max(3, draws))])
    return means[:3], float(means.mean()), float(means.std())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--queries", type=int, default=1000, help="images asked about per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=0, help="also compare hold-outs' typicality "
                    "over this many seeded draws (0: no)")
    ap.add_argument("--run", type=int, default=100, help="run length compared with single "
                    "images by --draws")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--output", default="bench/results")
    args = ap.parse_args()
    if args.queries < 1:
        ap.error(f"Expected --queries >= 1. Received: {args.queries}")
    if args.draws < 0 or args.run < 1:
        ap.error(f"Expected --draws >= 0 and --run >= 1. Received: {args.draws}, {args.run}")
    rng = np.random.default_rng(args.seed)
    lines = ["| data set | pairs | " + " | ".join(f"within {g} places" for g in GAPS)
             + " | median distance |", "|---|---|" + "---|" * (len(GAPS) + 1)]
    typical = ["| data set | class | run | seeds 0 / 1 / 2 | over the draws | z, seeds 0-2 |",
               "|---|---|---|---|---|---|"]
    for name in args.datasets.split(","):
        data = load_dataset(name)
        near, rand = [], []
        for c in np.unique(data.y_train):
            places = np.flatnonzero(data.y_train == c)
            x = data.x_train[places].reshape(len(places), -1).astype(np.float32) / 255
            a, b = neighbour_gaps(x, places, args.queries, rng)
            near.append(a)
            rand.append(b)
            if args.draws:
                dist = knn_distance(x)
                for run in (1, args.run):
                    seeds, mean, std = holdout_typicality(dist, args.val_fraction, run,
                                                          args.draws)
                    typical.append(f"| {name} | {data.class_names[c]} | {run} | "
                                   + " / ".join(f"{v:.2f}" for v in seeds)
                                   + f" | {mean:.2f} ± {std:.2f} | "
                                   + " / ".join(f"{(v - mean) / std:+.1f}" for v in seeds)
                                   + " |")
        for label, gaps in (("nearest neighbour", np.concatenate(near)),
                            ("random pair", np.concatenate(rand))):
            lines.append(f"| {name} | {label} | " + " | ".join(
                f"{100 * np.mean(gaps < g):.1f}%" for g in GAPS) + f" | {np.median(gaps):,.0f} |")
        print("\n".join(lines[-2:]), flush=True)
    md = (f"### Places in the training file between an image and its nearest neighbour "
          f"(same class, pixel L2; {args.queries} images a class, seed {args.seed})\n\n"
          + "\n".join(lines) + "\n")
    if args.draws:
        md += (f"\n### How typical each class's hold-out is: mean distance of its images to "
               f"their 5 nearest other training images (squared pixel L2), seeds 0-2 and "
               f"{args.draws} seeded draws, val_fraction {args.val_fraction:g}\n\n"
               + "\n".join(typical) + "\n")
    atomic_write_text(Path(args.output) / "holdout-locality.md", md)
    print(md)


if __name__ == "__main__":
    main()
