"""Where the scoring service's time goes under load: py-spy on a real server during one load
phase of ``bench/serve_bench.py`` (64-image v1 JSON batches at concurrency 8 by default).

    python bench/serve_profile.py --models models --model mnist-0-conv-vae [--seconds 15]
        [--body v1|v2] [--raw FILE]

py-spy (``pip install py-spy``; in the dev extra) samples every thread of the server at
100 Hz, idle ones included, so each thread has one sample per tick. Prints, per thread, the
samples in which it waited (an idle executor worker, the event loop in ``select``, a thread
blocked on a result), ran onnxruntime (``Session.run``) or ran Python, then the busiest frames of the CPU-pool
threads' request reading (`_parse_and_decode_json` and below, by file and line). A sample
taken while a thread waits for the GIL counts as running on the line it waits at: that is
how a numpy pass of 20 us can collect as many samples as a parse of 300 us.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb

#: Leaf frames that mean a thread is waiting: an idle executor worker, the event loop in
#: ``select``, a thread blocked on a result. ``Session.run`` is onnxruntime computing.
WAITING = ("_worker", "Runner.run", "Condition.wait")


def summarize(raw: Path, top: int = 12) -> str:
    """py-spy's ``--format raw`` output (``thread;frame;...;frame count`` lines) -> text."""
    states: collections.Counter = collections.Counter()
    reading: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r" \((.*?):(\d+)\)", r" \1:\2", f) for f in stack.split(";")]
        thread = frames[0].split(": ")[-1]
        leaf = frames[-1].split(" ")[0]
        state = ("onnxruntime" if leaf == "Session.run" else
                 "waiting" if leaf in WAITING else "python")
        states[(thread, state)] += int(count)
        marks = [i for i, f in enumerate(frames) if "_parse_and_decode_json" in f]
        if marks:
            below = " > ".join(f.split("/")[-1] for f in frames[marks[0] + 1:]) or "(itself)"
            reading[below] += int(count)
    lines = ["| thread | state | samples |", "|---|---|---|"]
    lines += [f"| {t} | {s} | {n} |" for (t, s), n in sorted(states.items())]
    lines += ["", "request reading (CPU-pool threads), samples by frame below "
              "_parse_and_decode_json:", ""]
    lines += [f"{n:6d}  {frames}" for frames, n in reading.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--body", choices=("v1", "v2"), default="v1")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw samples here")
    args = p.parse_args()
    # The venv's own first (pip install puts it beside the interpreter), then PATH.
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        p.error("Expected py-spy on PATH (pip install py-spy). Received: none found")
    if args.seconds <= 0 or args.batch < 1 or args.concurrency < 1:
        p.error(f"Expected --seconds > 0, --batch and --concurrency >= 1. Received: "
                f"{args.seconds}, {args.batch}, {args.concurrency}")
    port = sb.free_port()
    proc = sb.start_server(args.models.resolve(), port)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.txt"
        try:
            sb.wait_ready(port, proc)
            x = sb.synthetic_images(args.batch, seed=6)
            if args.body == "v1":
                request = sb._request("POST", f"/v1/models/{args.model}/score", sb.v1_body(x),
                                      {"Content-Type": "application/json"})
            else:
                request = sb._request("POST", f"/v2/models/{args.model}/infer",
                                      *sb.v2_binary_body(x))
            sb.phase(port, request, args.concurrency, 50, 5, args.batch)  # warm-up
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(proc.pid), "--threads", "--idle", "--rate", "100",
                 "--duration", str(int(args.seconds)), "--format", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load = sb.phase(port, request, args.concurrency, 10**9, args.seconds + 1, args.batch)
            recorder.wait()
        finally:
            sb.stop_server(proc)
        if not raw.exists():
            raise SystemExit("Expected py-spy's samples. Received: none (py-spy may need "
                             "ptrace permission: run as the server's user or as root)")
        if args.raw:
            shutil.copy(raw, args.raw)
        print(f"{args.batch}-image {args.body} requests at concurrency {args.concurrency}: "
              f"{load['images_per_s']:.0f} images/s while sampled (py-spy slows the server)\n")
        print(summarize(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
