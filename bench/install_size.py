"""Installed size of the light (``.[serve]``) and full (``.[full]``) installs, side by side.

    python bench/install_size.py [--extras serve,full]

Each install goes into a new virtual environment in a temporary folder (pip's cache makes a
second run fast); prints the size of its site-packages, its number of distributions, whether
TensorFlow is in it, and the install's wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", default="serve,full")
    args = ap.parse_args()
    print("| install | site-packages | distributions | TensorFlow | install time |\n"
          "|---|---|---|---|---|")
    for extra in args.extras.split(","):
        with tempfile.TemporaryDirectory(prefix=f"size-{extra}-") as tmp:
            venv = Path(tmp) / "venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            py = venv / "bin" / "python"
            t = time.perf_counter()
            subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[{extra}]"],
                           check=True)
            seconds = time.perf_counter() - t
            site = next((venv / "lib").glob("python3*/site-packages"))
            dists = len(list(site.glob("*.dist-info")))
            tf = any(site.glob("tensorflow-*.dist-info"))
            print(f"| `.[{extra}]` | {_size(site) / 2**20:,.0f} MiB | {dists} | "
                  f"{'yes' if tf else 'no'} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
