"""Soak and overload test of the scoring service (not run in CI: it takes ~12 minutes).

1. **Capacity**: a closed-loop phase (``--concurrency`` connections sending ``--batch``-image v1
   JSON requests back to back) measures the maximum throughput in requests/s.
2. **Soak**: an open-loop phase at ``--soak-load`` (80%) of that maximum for ``--duration``
   seconds (600): requests are *scheduled* at a fixed rate and latency is measured from the
   scheduled time, so a slow server cannot hide its queueing (no coordinated omission). The
   server's resident memory is sampled throughout; its growth after the first minute is the
   leak indicator.
3. **Overload**: ``--overload-factor`` (3x) the maximum for ``--overload`` seconds (30): the
   service must shed load with ``503`` + ``Retry-After`` (``ANOMALY_MAX_QUEUED_IMAGES``)
   instead of queueing without bound, and nothing but 200 and 503 may come back.
4. **Recovery**: back to the soak rate for ``--recovery`` seconds (30): 503s must stop and the
   p99 latency return near the soak's.

Prints p50/p99 latency, failures (anything but 200 in soak/recovery; anything but 200/503, or a
503 without Retry-After, in overload), and RSS growth; exits 1 when a check fails. ``--output``
also writes the results as JSON (atomically). Only 127.0.0.1 is contacted.

    python bench/soak.py                                    # untrained conv-ae, 10 min soak
    python bench/soak.py --models models --model mnist-0-conv-vae --duration 600
    python bench/soak.py --duration 20 --overload 10 --recovery 10     # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # the sibling script: server, client, images


class Connection(sb.Connection):
    """A keep-alive connection that also returns the response headers.

    ``closing``: the server said ``Connection: close`` with its last answer (the answer still
    counts; the connection is not reused). ``used``: answers received on it so far.
    """

    closing = False
    used = 0

    async def exchange(self, raw: bytes) -> tuple[int, dict[bytes, bytes]]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key:
                headers[key.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        self.closing = headers.get(b"connection") == b"close"
        self.used += 1
        return status, headers


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc (Linux); ``None`` elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def open_loop(port: int, raw: bytes, rate: float, seconds: float, *, pid: int,
                    max_connections: int = 512, rss_every: float = 5.0) -> dict:
    """Send ``raw`` at ``rate`` requests/s for ``seconds``; latency from the scheduled time."""
    free: list[Connection] = []
    opened = 0
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    ok_latencies: list[float] = []
    errors = 0
    missing_retry_after = 0
    not_sent = 0  # the client had no connection left: counted as failures
    rss: list[tuple[float, int]] = []
    tasks: set[asyncio.Task] = set()

    async def one(conn: Connection, scheduled: float) -> None:
        nonlocal errors, missing_retry_after, opened
        try:
            try:
                status, headers = await conn.exchange(raw)
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                # A kept-alive connection the server closed while it was idle (uvicorn does
                # after its keep-alive timeout): send again on a new one, as HTTP clients do.
                if conn.used == 0 or (isinstance(exc, asyncio.IncompleteReadError)
                                      and exc.partial):
                    raise
                conn.close()
                conn = await Connection.open(port)
                status, headers = await conn.exchange(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            opened -= 1
            conn.close()
            return
        latency = time.perf_counter() - scheduled
        latencies.append(latency)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            ok_latencies.append(latency)
        elif status == 503 and b"retry-after" not in headers:
            missing_retry_after += 1
        if conn.closing:
            conn.close()
            opened -= 1
        else:
            free.append(conn)

    start = time.perf_counter()
    next_rss = start
    n = 0
    while True:
        scheduled = start + n / rate
        if scheduled > start + seconds:
            break
        now = time.perf_counter()
        if scheduled > now:
            await asyncio.sleep(scheduled - now)
        if time.perf_counter() >= next_rss:
            value = rss_bytes(pid)
            if value is not None:
                rss.append((time.perf_counter() - start, value))
            next_rss += rss_every
        n += 1
        if free:
            conn = free.pop()
        elif opened < max_connections:
            opened += 1
            try:
                conn = await Connection.open(port)
            except OSError:
                opened -= 1
                errors += 1
                continue
        else:
            not_sent += 1
            continue
        task = asyncio.get_running_loop().create_task(one(conn, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    for conn in free:
        conn.close()
    elapsed = time.perf_counter() - start

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(values) * 1e3, q)) if values else None

    return {"rate": rate, "seconds": elapsed, "scheduled": n, "statuses": statuses,
            "errors": errors, "not_sent": not_sent, "missing_retry_after": missing_retry_after,
            "p50_ms": pct(ok_latencies, 50), "p99_ms": pct(ok_latencies, 99),
            "p99_all_ms": pct(latencies, 99), "connections": opened, "rss": rss}


def run_open_loop(*args, **kwargs) -> dict:
    return asyncio.run(open_loop(*args, **kwargs))


def rss_growth(rss: list[tuple[float, int]], skip: float = 60.0) -> dict:
    """RSS growth after the first ``skip`` seconds (warm-up allocations are not a leak)."""
    later = [(t, v) for t, v in rss if t >= skip] or rss
    if len(later) < 2:
        return {"start_mib": None, "end_mib": None, "growth_mib": None, "mib_per_min": None}
    t = np.array([p[0] for p in later])
    v = np.array([p[1] for p in later], dtype=np.float64) / 2**20
    slope = float(np.polyfit(t, v, 1)[0] * 60) if np.ptp(t) > 0 else 0.0
    return {"start_mib": float(v[0]), "end_mib": float(v[-1]),
            "growth_mib": float(v[-1] - v[0]), "mib_per_min": slope}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sb.add_model_args(p)
    p.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--concurrency", type=int, default=8, help="capacity phase connections")
    p.add_argument("--capacity", type=float, default=15.0, help="capacity phase seconds")
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    p.add_argument("--soak-load", type=float, default=0.8, help="soak rate / max (0.8)")
    p.add_argument("--overload", type=float, default=30.0, help="overload seconds")
    p.add_argument("--overload-factor", type=float, default=3.0, help="overload rate / max")
    p.add_argument("--recovery", type=float, default=30.0, help="recovery seconds")
    p.add_argument("--max-queued-images", type=int, default=256,
                   help="the server's ANOMALY_MAX_QUEUED_IMAGES (default 256)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="fail when RSS grows more than this during the soak (default 64)")
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        if args.models:
            models = args.models.resolve()
            name = args.model or sorted(d.name for d in models.iterdir() if d.is_dir()
                                        and not d.name.startswith((".", "_")))[0]
        elif args.artifact:
            artifact = args.artifact.resolve()
            name = artifact.parent.name
            models = tmp / "models"
            (models / name).mkdir(parents=True)
            (models / name / artifact.name).symlink_to(artifact, target_is_directory=True)
        else:
            name = sb.build_untrained(args.architecture, tmp / "models").parent.name
            models = tmp / "models"
        port = sb.free_port()
        proc = sb.start_server(models, port,
                               ANOMALY_MAX_QUEUED_IMAGES=str(args.max_queued_images))
        results: dict = {"model": name, "batch": args.batch,
                         "max_queued_images": args.max_queued_images}
        try:
            sb.wait_ready(port, proc)
            x = sb.synthetic_images(args.batch, seed=7)
            raw = sb._request("POST", f"/v1/models/{name}/score", sb.v1_body(x),
                              {"Content-Type": "application/json"})
            sb.phase(port, raw, args.concurrency, 200, 5, args.batch)  # warm-up
            cap = sb.phase(port, raw, args.concurrency, 10**9, args.capacity, args.batch)
            max_rate = cap["requests_per_s"]
            results["capacity"] = cap
            print(f"capacity: {max_rate:.0f} requests/s = {cap['images_per_s']:.0f} images/s "
                  f"(p99 {cap['p99_ms']:.1f} ms at concurrency {args.concurrency})", flush=True)
            phases = (("soak", args.soak_load, args.duration),
                      ("overload", args.overload_factor, args.overload),
                      ("recovery", args.soak_load, args.recovery))
            for label, factor, seconds in phases:
                print(f"{label}: {factor * max_rate:.0f} requests/s for {seconds:.0f} s ...",
                      flush=True)
                results[label] = run_open_loop(port, raw, factor * max_rate, seconds,
                                               pid=proc.pid)
        finally:
            sb.stop_server(proc)

    soak, over, rec = results["soak"], results["overload"], results["recovery"]
    growth = results["rss_growth"] = rss_growth(soak["rss"])
    checks = {
        "soak: every request 200": set(soak["statuses"]) <= {200} and not soak["errors"]
        and not soak["not_sent"],
        "overload: only 200 and 503": set(over["statuses"]) <= {200, 503}
        and not over["errors"],
        "overload: load shed with 503": over["statuses"].get(503, 0) > 0,
        "overload: every 503 has Retry-After": over["missing_retry_after"] == 0,
        "recovery: no 503, every request 200": set(rec["statuses"]) <= {200}
        and not rec["errors"] and not rec["not_sent"],
        "recovery: p99 within 2x the soak's": rec["p99_ms"] is not None
        and soak["p99_ms"] is not None and rec["p99_ms"] <= 2 * soak["p99_ms"] + 5,
        "soak: RSS growth within bound": growth["growth_mib"] is None
        or growth["growth_mib"] <= args.max_rss_growth_mib,
    }
    results["checks"] = checks

    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"

    print("\n| phase | rate (req/s) | p50 | p99 | statuses | failures |\n|---|---|---|---|---|---|")
    for label in ("soak", "overload", "recovery"):
        r = results[label]
        bad = r["errors"] + r["not_sent"] + sum(
            c for s, c in r["statuses"].items() if s not in ((200, 503) if label == "overload"
                                                             else (200,)))
        print(f"| {label} | {r['rate']:.0f} | {ms(r['p50_ms'])} | {ms(r['p99_ms'])} | "
              f"{dict(sorted(r['statuses'].items()))} | {bad} |")
    if growth["growth_mib"] is not None:
        print(f"\nRSS during the soak (after the first minute): {growth['start_mib']:.0f} -> "
              f"{growth['end_mib']:.0f} MiB ({growth['growth_mib']:+.1f} MiB, "
              f"{growth['mib_per_min']:+.2f} MiB/min)")
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    if args.output:
        for label in ("soak", "overload", "recovery"):
            results[label]["rss"] = [[t, v] for t, v in results[label]["rss"]]
        sb.write_json_atomically(args.output, results)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
