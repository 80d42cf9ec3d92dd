"""Pipeline benchmarks: `anomaly fit` wall time and peak memory, in-process scoring throughput.

    python bench/pipeline_bench.py [--runs 3] [--config configs/mnist.yaml] [--skip-fit]

Prints medians (these machines are noisy) as a markdown table for the README. The fit is timed
end to end as a user runs it (a fresh process, data already cached), and its peak resident
memory is read from the kernel (ru_maxrss of the child). Scoring runs in one process on 10,000
MNIST test images, after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_fit(runs: int, config: str | None, normal_class: str) -> list[tuple[float, float]]:
    exe = Path(sys.executable).with_name("anomaly")
    out = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(exe), "fit", "--normal-class", normal_class, "--output", tmp, "--quiet"]
            if config:
                cmd += ["--config", config]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                sys.exit(f"fit failed:\n{proc.stderr[-2000:]}")
            # ru_maxrss of children is the max over all waited-for children, in KiB on Linux:
            # the peak of the largest run so far, not of this run alone.
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            auroc = next((ln for ln in proc.stdout.splitlines() if ln.startswith("AUROC")), "")
            print(f"fit run {i + 1}: {wall:.1f} s, peak RSS so far {peak / 1024:.0f} MiB; "
                  f"{auroc}", flush=True)
            out.append((wall, peak / 1024 / 1024))
    return out


def bench_score(runs: int, config: str | None, normal_class: str) -> tuple[float, str]:
    from anomaly.config import resolve
    from anomaly.data.builtin import load_dataset
    from anomaly.detector import Detector

    cfg = resolve(config, {"normal_classes": normal_class, "epochs": 1})
    ds = load_dataset(cfg.dataset)
    x_train = ds.x_train[ds.y_train == int(normal_class)]
    # One epoch on 2,000 images: the weights do not change the speed.
    det = Detector.from_config(cfg.detector).fit(x_train[:2000])
    x = ds.x_test.astype("float32") / 255.0
    det.scorer(x[:1024])  # trace and warm up
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        det.scorer(x)
        rates.append(len(x) / (time.perf_counter() - t))
    return statistics.median(rates), f"{cfg.model}, score {det.resolved_score}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    ap.add_argument("--normal-class", default="0")
    ap.add_argument("--skip-fit", action="store_true")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    rows = []
    if not args.skip_fit:
        fits = bench_fit(args.runs, args.config, args.normal_class)
        walls = [w for w, _ in fits]
        peaks = [p for _, p in fits]
        rows.append(("`anomaly fit --normal-class 0` (data cached), median wall time",
                     f"{statistics.median(walls):.1f} s (runs: "
                     + ", ".join(f"{w:.1f}" for w in walls) + ")"))
        rows.append(("peak resident memory of fit (max over runs)", f"{max(peaks):.2f} GiB"))
    rate, what = bench_score(max(args.runs, 5), args.config, args.normal_class)
    rows.append((f"in-process scoring of 10,000 images ({what}), median",
                 f"{rate:,.0f} images/s"))
    print("\n| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
