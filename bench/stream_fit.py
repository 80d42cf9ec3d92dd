"""Peak memory of ``anomaly fit`` with its training images streamed from disk and read into
memory, on a data set larger than a memory budget.

    flock /tmp/anomaly-train.lock python bench/stream_fit.py data/stream-bench --budget 4

Writes (once; an existing folder is reused) 128x128 colour images whose decoded float32 size
exceeds ``--budget`` GiB: the MVTec AD layout of bench/synthetic_mvtec.py (PNG files, a small
test split, so the fit is evaluated too), or ``--format npy``, uint8 ``.npy`` shards of the
same textures (no test split). Then runs ``anomaly fit --stream always`` and ``--stream
never`` on it, each in its own process, and prints a Markdown table of each one's peak
resident memory (the kernel's count for that process, ``wait4``), wall time and AUROC. Run it on
an idle machine: the in-memory run needs about twice the data set's decoded size.

A quick check that it works: ``python bench/stream_fit.py /tmp/sb --images 40 --size 32x32
--test-good 10 --test-defect 3 --fit-args "--model dense-ae --force-calibration"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Images per ``.npy`` shard with ``--format npy``.
SHARD_IMAGES = 2000


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_data(root: Path, fmt: str, n: int, size: tuple[int, int], test_good: int,
               test_defect: int, seed: int) -> None:
    from synthetic_mvtec import generate, texture

    if fmt == "png":
        generate(root, n_train=n, n_test_good=test_good, n_test_defect=test_defect, size=size,
                 seed=seed)
        return
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for s, start in enumerate(range(0, n, SHARD_IMAGES)):
        count = min(SHARD_IMAGES, n - start)
        shard = np.stack([np.round(texture(rng, size) * 255).astype(np.uint8)
                          for _ in range(count)])
        np.save(root / f"shard-{s:04d}.npy", shard)


def measure(dataset: Path, stream: str, output: Path, fit_args: list[str]) -> dict:
    """One ``anomaly fit`` in a child process: its peak RSS (``wait4``: that process's own
    count), wall time and JSON result."""
    output.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "anomaly.cli", "fit", "--dataset", str(dataset), "--stream",
           stream, "--output", str(output), "--name", stream, "--no-report", "--json",
           *fit_args]
    out_file, err_file = output / f"{stream}.json", output / f"{stream}.log"
    t0 = time.perf_counter()
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    result = {"stream": stream, "rc": rc, "wall_s": time.perf_counter() - t0,
              "peak_rss": usage.ru_maxrss * 1024, "log": err_file}  # KiB on Linux
    if rc == 0:
        result.update(json.loads(out_file.read_text()))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="data set folder (written when absent)")
    p.add_argument("--budget", type=float, default=4.0, help="GiB the decoded training images "
                   "must exceed (default: 4)")
    p.add_argument("--images", type=int, help="training images (default: enough for --budget)")
    p.add_argument("--size", default="128x128", help="HxW (default: 128x128)")
    p.add_argument("--format", choices=("png", "npy"), default="png")
    p.add_argument("--test-good", type=int, default=100)
    p.add_argument("--test-defect", type=int, default=25, help="per defect type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="always,never", help="--stream values to run")
    p.add_argument("--fit-args", default="--epochs 1 --target-fpr 5%",
                   help="more anomaly fit flags (default: '--epochs 1 --target-fpr 5%%')")
    p.add_argument("--output", type=Path, help="models folder (default: a temporary one)")
    args = p.parse_args(argv)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w or h))
    per_image = size[0] * size[1] * 3 * 4
    n = args.images or math.floor(args.budget * 2**30 / per_image) + 1
    if not args.root.exists():
        t0 = time.perf_counter()
        write_data(args.root, args.format, n, size, args.test_good, args.test_defect, args.seed)
        print(f"wrote {n} training images to {args.root} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    from anomaly.data.stream import available_memory, decoded_bytes

    need = decoded_bytes(str(args.root))
    print(f"decoded training images: {_gib(need)} (budget {args.budget:g} GiB); memory "
          f"available now: {_gib(available_memory())}", file=sys.stderr)
    args.output = args.output or Path(tempfile.mkdtemp(prefix="stream-fit-"))
    rows = []
    for stream in args.modes.split(","):
        print(f"fit --stream {stream} ...", file=sys.stderr, flush=True)
        r = measure(args.root, stream, args.output, shlex.split(args.fit_args))
        if r["rc"]:
            print(Path(r["log"]).read_text()[-2000:], file=sys.stderr)
        auroc = (r.get("metrics") or {}).get("auroc")
        rows.append(f"| {stream} | {_gib(r['peak_rss'])} | {r['wall_s']:.0f} s | "
                    f"{r.get('epochs', '-')} | {'-' if auroc is None else f'{auroc:.3f}'} | "
                    f"{'ok' if r['rc'] == 0 else 'failed (' + str(r['rc']) + ')'} |")
    print(f"\n{n} training images of {size[0]}x{size[1]}x3 ({args.format}), "
          f"{_gib(need)} decoded; fit {args.fit_args}\n")
    print("| --stream | peak RSS | wall | epochs | AUROC | result |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
