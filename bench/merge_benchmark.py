"""Merge the CSVs of several ``anomaly benchmark`` runs into one table (CSV + markdown).

    python bench/merge_benchmark.py --config configs/mnist.yaml --preset accurate \\
        --output bench/results/mnist-conv-vae-accurate /tmp/bench/mnist-*.csv

The README's accurate-preset tables were measured one class per command, each under the
training lock (``flock /tmp/anomaly-train.lock anomaly benchmark ... --classes C --tag ...``),
so that other work could run between classes but never during one; this writes the merged
table with the benchmark's own markdown (per-class mean ± std over seeds, FPR columns).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.benchmark import markdown
from anomaly.config import resolve
from anomaly.utils import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csvs", nargs="+", type=Path, help="CSV files of anomaly benchmark runs")
    ap.add_argument("--config", required=True, help="the config file the runs used")
    ap.add_argument("--preset", help="the preset the runs used")
    ap.add_argument("--output", required=True, type=Path, help="output stem (no suffix)")
    args = ap.parse_args()
    df = pd.concat([pd.read_csv(p) for p in args.csvs]).sort_values(["class", "seed"])
    cfg = resolve(args.config, {"preset": args.preset})
    atomic_write_text(args.output.with_suffix(".csv"),
                      df.to_csv(index=False, float_format="%.5f"))
    md = markdown(df, cfg)
    atomic_write_text(args.output.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
