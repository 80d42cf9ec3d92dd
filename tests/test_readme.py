"""The README's ``bash`` blocks run as written, in order, in an empty folder (issue #14).

What a newcomer types after the install line must work: each block runs with ``bash -eu`` in
one temporary folder, under ``ANOMALY_QUICK=1`` (1 epoch on 300 images, see anomaly/cli.py) with
this interpreter's ``bin/`` first on ``PATH`` (``anomaly``, ``python``). A marker comment on the
line before a block changes that:

- ``<!-- readme-test: skip (why) -->``: not run (the install line, pytest itself, hours-long
  benchmarks); the reason is required.
- ``<!-- readme-test: background (why) -->``: a server, started in the background, waited for
  (``/readyz``) and stopped at the end. It listens on a free port instead of 8000
  (``ANOMALY_PORT``, and ``localhost:8000`` in the later blocks is rewritten to it), so the
  test never meets another server on the machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|background)\s*(?:\((.*)\))?\s*-->$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    mode: str = "run"  # run, skip or background
    why: str = ""


def readme_blocks(text: str) -> list[Block]:
    """The ```` ```bash ```` blocks of ``text`` in order, with their markers."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            m = _MARKER.match(prev)
            blocks.append(Block(start + 1, "\n".join(body) + "\n",
                                m.group(1) if m else "run", (m.group(2) or "") if m else ""))
        i += 1
    return blocks


def test_readme_blocks_are_runnable_as_written():
    """No placeholders in what runs; every skip says why; the newcomer's path is all there."""
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b.mode != "skip"]
    assert all(b.why.strip() for b in blocks if b.mode == "skip"), blocks
    for b in runnable:
        code = "\n".join(ln.split(" #")[0] for ln in b.text.splitlines())  # comments may say
        bad = re.findall(r"<[A-Za-z_ -]+>|\bNAME\b|\bVERSION\b", code)
        assert not bad, f"README line {b.line}: placeholders {bad}"
    text = "".join(b.text for b in runnable)
    for step in ("anomaly fit", "anomaly data sample", "anomaly score", "anomaly evaluate",
                 "anomaly serve", "curl"):
        assert step in text
    assert sum(b.mode == "background" for b in blocks) == 1


def test_marker_parsing():
    text = ("a\n<!-- readme-test: skip (slow) -->\n\n```bash\nx\n```\n"
            "```bash\ny\n```\n<!-- readme-test: background -->\n```bash\nz\n```\n")
    assert [(b.line, b.text, b.mode, b.why) for b in readme_blocks(text)] == [
        (4, "x\n", "skip", "slow"), (7, "y\n", "run", ""), (11, "z\n", "background", "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the README's server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the README's server was not ready on port {port} in {timeout} s")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.e2e
def test_readme_runs_in_order_on_a_fresh_folder(tmp_path, mnist):
    """The whole Quick start and what follows, on real MNIST (cached by the fixture)."""
    port = _free_port()
    env = {**os.environ, "ANOMALY_QUICK": "1", "ANOMALY_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("ANOMALY_MODELS_DIR", None)
    outputs: dict[int, subprocess.CompletedProcess] = {}
    server = None
    try:
        for block in readme_blocks(README.read_text()):
            if block.mode == "skip":
                continue
            script = re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\g<1>:{port}", block.text)
            if block.mode == "background":
                log = open(tmp_path / f"server-{block.line}.log", "w")  # noqa: SIM115
                server = subprocess.Popen(["bash", "-eu", "-c", script], cwd=tmp_path, env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                _wait_ready(port, server)
                continue
            proc = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", script],
                                  cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300, check=False)
            assert proc.returncode == 0, (f"README block at line {block.line} failed "
                                          f"({proc.returncode}):\n{script}\n{proc.stderr}")
            assert "Traceback" not in proc.stderr, proc.stderr
            outputs[block.line] = proc
    finally:
        if server is not None:
            _stop(server)

    out = "".join(p.stdout for p in outputs.values())
    model = tmp_path / "models" / "mnist-0-conv-vae"
    versions = [p for p in model.iterdir() if not p.name.startswith(".")]
    assert len(versions) == 1
    assert f"Artifact: models/mnist-0-conv-vae/{versions[0].name}" in out
    assert re.search(r"Time: [\d.]+ s \(start-up [\d.]+, data [\d.]+, training [\d.]+, "
                     r"calibration [\d.]+, evaluation [\d.]+, save [\d.]+, report [\d.]+\)", out)
    assert (tmp_path / "models" / "_reports" / "mnist-0-conv-vae" / versions[0].name
            / "report.html").is_file()
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 40 and sorted(set(scores["label_name"])) == [0, 7]
    assert sorted(scores["id"]) == sorted(str(p.relative_to(tmp_path / "digits"))
                                          for p in (tmp_path / "digits").rglob("*.png"))
    assert (tmp_path / "rep" / "report.html").is_file()
    assert len(pd.read_csv(tmp_path / "codes.csv")) == 40
    assert len(list((tmp_path / "clean").rglob("*.png"))) == 40
    # The Serving block's last command scored the one image through the server.
    assert '"scores"' in out or '"score"' in out, out[-2000:]
