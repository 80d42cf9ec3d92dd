"""Load test of the scoring service: a real server process on 127.0.0.1 and a bounded load
generator, compared with the raw in-process model throughput.

Reports single-image latency p50/p99 at concurrency 1, throughput (images/s) at concurrency 8
with single-image requests and with 64-image batches (v1 JSON and V2 binary tensors), and the
ratio of served to raw in-process throughput for the same batch size (raw measured before the
server starts and after it stops; the ratio divides by the mean of the two).

    python bench/serve_bench.py                                 # default conv-ae architecture
    python bench/serve_bench.py --artifact models/mnist-0-conv-ae/20261123T154700Z
    python bench/serve_bench.py --models models --model mnist-0-conv-ae --duration 20

Without --artifact/--models it builds an *untrained* model of --architecture with the default
hyper-parameters (the same computation as a trained one, so the timings hold) and calibrates it
on synthetic images; nothing is trained. Every phase stops after --requests requests or
--duration seconds, whichever comes first. Only 127.0.0.1 is ever contacted. The load
generator is a minimal keep-alive HTTP/1.1 client on asyncio, so it costs the server's CPU as
little as possible; on a small machine it still shares the cores with the server, which the
numbers include.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """Soft Gaussian blobs, float32 ``(n, 28, 28)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy, cx = 13.5 + rng.uniform(-4, 4, (2, n))
    s = rng.uniform(2.0, 5.0, n)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return np.exp(-d2 / (2 * s[:, None, None] ** 2)).astype(np.float32)


def build_untrained(architecture: str, root: Path) -> Path:
    """An untrained, calibrated artifact of ``architecture`` at ``root/bench-ARCH/1``."""
    from anomaly.detector import Detector

    # One epoch: the weights do not change the speed, and fit builds the kNN memory and the
    # standardizer the default score needs.
    det = Detector(architecture, epochs=1, force_calibration=True)
    det.fit(synthetic_images(256, seed=1))
    name = f"bench-{architecture}"
    return det.save(root / name / "1", metadata={"name": name, "version": "1",
                                                 "dataset": "synthetic (untrained model)",
                                                 "normal_classes": []})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(models: Path, port: int, **env_overrides: str) -> subprocess.Popen:
    env = {**os.environ, "ANOMALY_LOG_LEVEL": "warning", "ANOMALY_ACCESS_LOG": "false",
           "ANOMALY_MAX_BATCH_IMAGES": "256", "PYTHONPATH": str(REPO), **env_overrides}
    return subprocess.Popen([sys.executable, "-m", "anomaly.cli", "serve", "--models",
                             str(models), "--host", HOST, "--port", str(port)],
                            cwd=REPO, env=env)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            status, _ = asyncio.run(_once(port, _request("GET", "/readyz", b"")))
            if status == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {timeout} s")


def _request(method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection (responses must carry Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _once(port: int, raw: bytes) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        return await conn.send(raw)
    finally:
        conn.close()


async def _phase(port: int, raw: bytes, concurrency: int, max_requests: int,
                 max_seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    issued = 0

    async def worker():
        nonlocal failures, issued
        conn = await Connection.open(port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                status, _ = await conn.send(raw)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    failures += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "failures": failures, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def phase(port: int, raw: bytes, concurrency: int, max_requests: int, max_seconds: float,
          images_per_request: int) -> dict:
    """Run one bounded load phase; adds images/s."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    cpu0 = time.process_time()
    out = runner(_phase(port, raw, concurrency, max_requests, max_seconds))
    # The load generator shares the cores with the server: say how much of them it took.
    out["client_cpu_s_per_s"] = (time.process_time() - cpu0) / out["seconds"]
    out["images_per_s"] = out["requests_per_s"] * images_per_request
    out["concurrency"], out["batch"] = concurrency, images_per_request
    return out


def raw_throughput(artifact: Path, batch: int, seconds: float) -> tuple[float, float, str]:
    """Images/s of ``detect`` on validated images in this process (no HTTP) with the runtime
    the server chose (``ANOMALY_RUNTIME``, as the server reads it): what the service runs per
    model call. Returns ``(images/s one image a call, images/s batch images a call, runtime)``,
    each rate measured for ``seconds``."""
    from anomaly.runtime import load_runtime

    det = load_runtime(artifact)

    def rate(n_images: int) -> float:
        x = synthetic_images(n_images, seed=3)
        for _ in range(5):
            det.detect(x, validated=True)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            det.detect(x, validated=True)
            n += n_images
        return n / (time.perf_counter() - start)

    return rate(1), rate(batch), det.runtime_


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def v1_body(x: np.ndarray) -> bytes:
    return json.dumps({"images": np.rint(x * 255).astype(int).tolist()}).encode()


def v2_binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps({
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "anomaly_score", "parameters": {"binary_data": True}},
                    {"name": "is_anomaly", "parameters": {"binary_data": True}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model to serve: --artifact, --models/--model, or an untrained --architecture."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifact", type=Path, help="one artifact directory (NAME/VERSION)")
    src.add_argument("--models", type=Path, help="a models directory; see --model")
    p.add_argument("--model", help="model name in --models (default: the first)")
    p.add_argument("--architecture", default="conv-ae",
                   help="untrained model to build when no artifact is given (default conv-ae)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--requests", type=int, default=3000, help="most requests per phase")
    p.add_argument("--duration", type=float, default=8.0, help="most seconds per phase")
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        if args.models:
            models = args.models.resolve()
            names = sorted(d.name for d in models.iterdir() if d.is_dir()
                           and not d.name.startswith("."))
            name = args.model or names[0]
            artifact = sorted(v for v in (models / name).iterdir() if v.is_dir()
                              and not v.name.startswith("."))[-1]
        else:
            if args.artifact:
                artifact = args.artifact.resolve()
                name = json.loads((artifact / "metadata.json").read_text()).get(
                    "name") or artifact.parent.name
                link = tmp / "models" / name / artifact.name
                link.parent.mkdir(parents=True)
                link.symlink_to(artifact, target_is_directory=True)
            else:
                artifact = build_untrained(args.architecture, tmp / "models")
                name = artifact.parent.name
            models = tmp / "models"
        # Raw numbers before the server starts and after it stops, each with the machine to
        # itself; the ratios divide by their mean, since raw alone moves 10-15% between runs of
        # a few seconds on these machines (bench/results/serve-bench-simdjson.md).
        raw_seconds = min(args.duration, 5)
        raw_before = raw_throughput(artifact, args.batch, raw_seconds)
        port = free_port()
        print(f"model {name} ({artifact}); server on {HOST}:{port}; "
              f"{os.cpu_count()} CPUs", flush=True)
        proc = start_server(models, port)
        results: dict = {"model": name, "artifact": str(artifact), "cpus": os.cpu_count()}
        try:
            wait_ready(port, proc)
            one = synthetic_images(1, seed=5)
            batch = synthetic_images(args.batch, seed=6)
            url = f"/v1/models/{name}/score"
            json_ct = {"Content-Type": "application/json"}
            single = _request("POST", url, v1_body(one), json_ct)
            batched = _request("POST", url, v1_body(batch), json_ct)
            v2 = _request("POST", f"/v2/models/{name}/infer", *v2_binary_body(batch))
            phase(port, single, 1, 300, 5, 1)  # warm-up
            phase(port, batched, args.concurrency, 20, 5, args.batch)
            bounds = (args.requests, args.duration)
            results["latency_c1_single"] = phase(port, single, 1, *bounds, 1)
            results["throughput_single"] = phase(port, single, args.concurrency, *bounds, 1)
            results["throughput_batch_json"] = phase(port, batched, args.concurrency, *bounds,
                                                     args.batch)
            results["throughput_batch_v2_binary"] = phase(port, v2, args.concurrency, *bounds,
                                                          args.batch)
        finally:
            stop_server(proc)
        raw_after = raw_throughput(artifact, args.batch, raw_seconds)
        for k, key in enumerate(("raw_single_images_per_s", "raw_batch_images_per_s")):
            results[key + "_before_after"] = [raw_before[k], raw_after[k]]
            results[key] = (raw_before[k] + raw_after[k]) / 2
        results["runtime"] = raw_after[2]

    lat = results["latency_c1_single"]
    rows = [
        ("single image, concurrency 1", f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} "
         f"ms ({lat['requests']} requests; load generator {lat['client_cpu_s_per_s']:.0%} of "
         "a core)", "p99 <= 5 ms"),
    ]
    ratios = {}
    for key, label, raw_key in (
            ("throughput_single", f"single images, concurrency {args.concurrency}",
             "raw_single_images_per_s"),
            ("throughput_batch_json", f"{args.batch}-image batches (v1 JSON), concurrency "
             f"{args.concurrency}", "raw_batch_images_per_s"),
            ("throughput_batch_v2_binary", f"{args.batch}-image batches (V2 binary), "
             f"concurrency {args.concurrency}", "raw_batch_images_per_s")):
        r = results[key]
        ratios[key] = r["images_per_s"] / results[raw_key]
        rows.append((label, f"{r['images_per_s']:.0f} images/s (p50 {r['p50_ms']:.1f} ms, p99 "
                     f"{r['p99_ms']:.1f} ms, {r['failures']} failed; load generator "
                     f"{r['client_cpu_s_per_s']:.0%} of a core); {ratios[key]:.0%} of raw "
                     f"batch-{r['batch']} {results[raw_key]:.0f} images/s (before / after "
                     "the server: {:.0f} / {:.0f})".format(*results[raw_key + "_before_after"]),
                     ">= 85% of raw" if "batch" in key else ">= 1,500 images/s"))
    results["ratios"] = ratios
    print(f"\nruntime: {results['runtime']} (server and raw side alike)")
    print("\n| phase | result | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.output:
        write_json_atomically(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
