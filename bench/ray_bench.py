"""Batch scoring of a million images: raw in-process, the local engine and Ray, in one run.

    flock /tmp/anomaly-train.lock python bench/ray_bench.py [--images 1000000] [--runtimes onnx,keras]

Without ``--artifact`` it trains the recommended MNIST detector (configs/mnist.yaml) for one
epoch on the zeros (the weights do not change the speed) and exports it to ONNX. The input is
the 10,000 MNIST test images repeated to ``--images`` rows, written as Parquet shards (an id
column and a pixel-array image column, row groups of ``--block-rows``). Then, for each runtime:

1. raw in-process scoring: ``detect`` on the 10,000 test images (median of ``--runs``);
2. ``anomaly score --engine local`` on the whole input, in this process;
3. ``anomaly score --engine ray`` on a Ray cluster started here on loopback: ``ray start
   --head`` plus a second node process (``ray start --address``), one CPU and one actor each.

Prints a markdown table: images/s, the ratio to raw in-process, and peak memory per process
(each actor's, for Ray). The local and Ray outputs are compared row by row (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(x: np.ndarray, n: int, folder: Path, *, files: int, block_rows: int) -> None:
    """``n`` rows cycling through ``x`` ``(m, 28, 28)`` uint8, as ``files`` Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    flat = x.reshape(len(x), -1)
    per_file = -(-n // files)
    for f in range(files):
        rows = np.arange(f * per_file, min(n, (f + 1) * per_file))
        pixels = flat[rows % len(x)]
        image = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), flat.shape[1])
        table = pa.table({"id": pa.array([f"r{r}" for r in rows]), "image": image})
        pq.write_table(table, folder / f"shard-{f:03d}.parquet", row_group_size=block_rows)


def _raw_rate(artifact: Path, runtime: str, x: np.ndarray, runs: int) -> float:
    from anomaly.runtime import load_runtime

    det = load_runtime(artifact, runtime=runtime)
    det.detect(x[:1024], validated=True)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        for s in range(0, len(x), 1024):
            det.detect(x[s : s + 1024], validated=True)
        rates.append(len(x) / (time.perf_counter() - t))
    return statistics.median(rates)


def _start_cluster(tmp: Path) -> str:
    port = _free_port()
    # `ray start --head` turns token authentication on: every node and this driver use the
    # token (~/.ray/auth_token, made here if missing).
    os.environ["RAY_AUTH_MODE"] = "token"
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", *common], check=True, env=env,
                   capture_output=True)
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}",
                    "--node-ip-address=127.0.0.1", *common[:2]], check=True, env=env,
                   capture_output=True)
    return f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--block-rows", type=int, default=10_000)
    ap.add_argument("--runtimes", default="onnx,keras")
    ap.add_argument("--runs", type=int, default=5, help="runs of the raw in-process timing")
    ap.add_argument("--artifact", help="an artifact exported to ONNX (default: train one)")
    args = ap.parse_args()

    import pandas as pd
    from runtime_bench import _artifact

    from anomaly.data.builtin import load_dataset
    from anomaly.engines import score_dataset
    from anomaly.export.onnx import export_onnx

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    address = None
    try:
        if args.artifact:
            artifact = Path(args.artifact)
        else:
            artifact = export_onnx(_artifact(tmp), tmp / "exported" / "1").path
        x_test = load_dataset("mnist").x_test
        t = time.perf_counter()
        write_shards(x_test, args.images, tmp / "input", files=args.files,
                     block_rows=args.block_rows)
        size = sum(p.stat().st_size for p in (tmp / "input").iterdir())
        print(f"input: {args.images:,} images in {args.files} Parquet files "
              f"({size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.0f} s)",
              flush=True)
        address = _start_cluster(tmp)
        x = x_test.astype(np.float32) / 255.0
        rows = []
        for runtime in args.runtimes.split(","):
            raw = _raw_rate(artifact, runtime, x, args.runs)
            rows.append((runtime, "raw in-process (10,000 images)", raw, None, 1))
            print(f"{runtime}: raw {raw:,.0f} images/s", flush=True)
            outs = {}
            for engine in ("local", "ray"):
                out = tmp / f"out-{runtime}-{engine}"
                s = score_dataset(artifact, tmp / "input", out, engine=engine,
                                  runtime=runtime, address=address if engine == "ray" else None)
                rows.append((runtime, f"{engine} engine ({args.images:,} images)",
                             s["images_per_s"], s["peak_rss_mib_per_process"], s["processes"]))
                print(f"{runtime}: {engine} {s['images_per_s']:,.0f} images/s, "
                      f"{s['processes']} processes, peak {s['peak_rss_mib_per_process']} MiB "
                      f"each", flush=True)
                outs[engine] = out
            a, b = (pd.concat(pd.read_parquet(p) for p in sorted(o.glob("part-*.parquet")))
                    for o in (outs["local"], outs["ray"]))
            same = a.reset_index(drop=True).equals(b.reset_index(drop=True))
            print(f"{runtime}: local and Ray outputs equal row by row: {same}", flush=True)
            for o in outs.values():
                shutil.rmtree(o)
        print("\n| runtime | how | images/s | vs raw in-process | processes | peak memory per "
              "process (MiB) |\n|---|---|---|---|---|---|")
        raw_of = {r[0]: r[2] for r in rows if r[1].startswith("raw")}
        for runtime, how, rate, rss, procs in rows:
            print(f"| {runtime} | {how} | {rate:,.0f} | {rate / raw_of[runtime]:.2f}x | "
                  f"{procs} | {rss if rss is not None else '-'} |")
        print(json.dumps({"images": args.images, "rows": [list(r) for r in rows]}))
    finally:
        if address is not None:
            import ray

            ray.shutdown()
            subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
