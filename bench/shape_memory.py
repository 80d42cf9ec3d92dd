"""Memory a scoring process keeps per distinct batch shape (why anomaly.scoring pads batches
to a short ladder of sizes, :func:`anomaly.scoring.padded_rows`).

    flock /tmp/anomaly-train.lock python bench/shape_memory.py [--sizes all|small|pow2] [--calls 1200]

Trains the recommended MNIST detector for one epoch on the zeros (bench/runtime_bench.py),
then calls ``detect`` ``--calls`` times on a random number of MNIST test images: ``all`` any
multiple of 8 up to 1,024 (what a busy service's micro-batcher makes), ``small`` up to 128,
``pow2`` powers of two only. Prints the process's resident memory every 200 calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=("all", "small", "pow2"), default="all")
    ap.add_argument("--calls", type=int, default=1200)
    args = ap.parse_args()

    from runtime_bench import _artifact

    from anomaly.data.builtin import load_dataset
    from anomaly.runtime import load_runtime

    det = load_runtime(_artifact(Path(tempfile.mkdtemp())), runtime="keras")
    x = load_dataset("mnist").x_test.astype(np.float32) / 255
    rng = np.random.default_rng(0)
    det.detect(x[:64], validated=True)
    print(f"start: {rss_mib():.0f} MiB", flush=True)
    t0 = time.perf_counter()
    for i in range(1, args.calls + 1):
        n = {"all": lambda: int(rng.integers(1, 129)) * 8,
             "small": lambda: int(rng.integers(1, 17)) * 8,
             "pow2": lambda: 2 ** int(rng.integers(3, 11))}[args.sizes]()
        det.detect(x[:n], validated=True)
        if i % 200 == 0:
            print(f"{i} calls: {rss_mib():.0f} MiB ({time.perf_counter() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
