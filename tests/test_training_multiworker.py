"""Multi-worker training for real: two ``anomaly fit`` processes on loopback, one cluster.

Both workers get the same ``TF_CONFIG`` but their own index and write to one output folder, as
the pods of deploy/k8s/examples/fit-multiworker-job.yaml do on their shared volume. Worker 1 is
killed (SIGKILL) once the chief has finished two epochs; the chief must then fail on its own,
with one error line, and both are started again, as Kubernetes restarts failed pods. They must
resume, not start over, and the chief alone writes the artifact, which must score like a
one-worker fit of the same configuration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from anomaly.artifact import read_artifact
from anomaly.training import STATE_FILE, read_state
from tests.conftest import anomaly_command, make_bars, make_blobs

pytestmark = pytest.mark.slow

EPOCHS = 12
#: Faster than the default 1e-3: twelve epochs come close to convergence, where two fits that
#: follow slightly different paths score alike (at 1e-3 the gap measured 0.012).
LEARNING_RATE = "0.003"
#: How long the survivor may take to notice the lost worker: TensorFlow's heartbeat timeout is
#: about 10 s (a crash on loopback is seen at once: the connection resets).
LOST_WORKER_S = 30
#: Measured: the resumed fit's AUROC on this slice is 0.004 below the one-worker fit's (0.966,
#: 0.970), the same in four runs. Both take the same steps on the same batches, but a resumed
#: run starts the shuffle again at its first epoch, and sums over two workers round otherwise.
AUROC_TOLERANCE = 0.01


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Normal blobs to train on, and a labelled slice of other normal blobs and anomalies: a
    faint bar across a blob, hard enough that the AUROC (about 0.97) is not pinned at 1."""
    root = tmp_path_factory.mktemp("data")
    np.save(root / "train.npy", make_blobs(1500, seed=0))
    normal = make_blobs(300, seed=10)
    anomalies = np.clip(make_blobs(300, seed=11) + 0.25 * make_bars(300, seed=2), 0, 1)
    x = np.concatenate([normal, anomalies]).astype(np.float32)
    y = np.r_[np.zeros(300, np.int64), np.ones(300, np.int64)]
    np.savez(root / "test.npz", x=x, y=y)
    return {"train": root / "train.npy", "test": root / "test.npz", "x": x, "y": y}


def _fit_args(data: dict, output: Path) -> list[str]:
    return ["fit", "--dataset", str(data["train"]), "--test-data", str(data["test"]),
            "--model", "dense-ae", "--hidden", "32", "--latent-dim", "4", "--score", "mse",
            "--aggregation", "mean", "--target-fpr", "1%", "--force-calibration",
            "--epochs", str(EPOCHS), "--batch-size", "64", "--learning-rate", LEARNING_RATE,
            "--output", str(output),
            "--name", "blobs", "--no-report"]


def _env(tf_config: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # Two workers on two cores: one thread each runs faster than both fighting for both.
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


class _Worker:
    """One ``anomaly fit`` process of the cluster, its stderr in ``log``."""

    def __init__(self, index: int, ports: list[int], data: dict, output: Path, log: Path):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [*anomaly_command(), *_fit_args(data, output), "--distribute", "multi-worker"],
                stdout=subprocess.DEVNULL, stderr=err, env=_env(tf_config))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def epochs_logged(self) -> list[int]:
        return [int(m) for m in re.findall(rf"^epoch (\d+)/{EPOCHS}:", self.text(), re.M)]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.log.name} still ran after {timeout:.0f} s:\n{_tail(self)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _tail(*workers: _Worker, lines: int = 25) -> str:
    return "\n".join(f"--- {w.log.name}\n" + "\n".join(w.text().splitlines()[-lines:])
                     for w in workers)


def _start(data: dict, output: Path, logs: Path, tag: str) -> list[_Worker]:
    ports = _free_ports(2)
    return [_Worker(i, ports, data, output, logs / f"{tag}-{i}.log") for i in (0, 1)]


def _roll_back(folder: Path) -> None:
    """Make a worker's state the one before its last, as if it was killed while saving."""
    state = json.loads((folder / STATE_FILE).read_text())
    (folder / STATE_FILE).write_text(json.dumps({"format": state["format"],
                                                 **state["previous"], "previous": None}))


def _auroc(artifact: Path, data: dict) -> float:
    from sklearn.metrics import roc_auc_score

    from anomaly.detector import Detector

    return float(roc_auc_score(data["y"], Detector.load(artifact).decision_function(data["x"])))


def test_two_workers_killed_and_restarted_resume_and_score_like_one(data, tmp_path):
    t0 = time.perf_counter()
    output, logs = tmp_path / "models", tmp_path / "logs"
    logs.mkdir()
    workers = _start(data, output, logs, "first")
    chief, other = workers
    try:
        deadline = time.monotonic() + 180
        while max(chief.epochs_logged(), default=0) < 2:  # its line comes after its state
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in workers):
                pytest.fail(f"the cluster did not train two epochs:\n{_tail(*workers)}")
            time.sleep(0.05)
        other.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        # The survivor ends on its own, with one error line, as a pod Kubernetes restarts.
        assert chief.wait(LOST_WORKER_S) == 1, _tail(chief)
        lost_after_s = time.monotonic() - t_kill
        errors = [ln for ln in chief.text().splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Expected every worker of the TF_CONFIG cluster" in errors[0]
        assert "Traceback" not in chief.text()
    finally:
        for w in workers:
            w.stop()

    # No artifact yet: only the workers' own states, side by side in the shared folder.
    entries = list((output / "blobs").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith(".resume-"), entries
    backup = entries[0]
    assert sorted(p.name for p in backup.iterdir()) == ["worker-0", "worker-1"]
    epochs = {w: read_state(backup / w)["epoch"] for w in ("worker-0", "worker-1")}
    if epochs["worker-0"] == epochs["worker-1"]:
        _roll_back(backup / "worker-1")
        epochs["worker-1"] -= 1
    resume = min(epochs.values())  # what both workers must agree on
    assert resume >= 1, epochs

    workers = _start(data, output, logs, "again")
    try:
        for w in workers:
            assert w.wait(180) == 0, _tail(w)
    finally:
        for w in workers:
            w.stop()
    for w in workers:
        assert f": {resume} of {EPOCHS} epochs done" in w.text(), _tail(w)
        assert w.epochs_logged() == list(range(resume + 1, EPOCHS + 1)), _tail(w)
    assert "Not the chief worker" in workers[1].text()

    # The chief alone wrote the artifact, and its state went with the workers' own.
    entries = list((output / "blobs").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries
    art = read_artifact(entries[0])
    assert art.metadata["distribute"] == "multi-worker"
    assert art.metadata["epochs_run"] == EPOCHS
    history = np.genfromtxt(art.file("history.csv"), delimiter=",", names=True)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))  # the epochs before, too

    single = subprocess.run([*anomaly_command(), *_fit_args(data, tmp_path / "single")],
                            capture_output=True, text=True, env=_env(None), timeout=180,
                            check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    (reference,) = (tmp_path / "single" / "blobs").iterdir()
    multi_auroc, single_auroc = _auroc(entries[0], data), _auroc(reference, data)
    print(f"AUROC multi-worker {multi_auroc:.4f}, one worker {single_auroc:.4f}; resumed after "
          f"epoch {resume}; the survivor failed {lost_after_s:.1f} s after the kill; "
          f"{time.perf_counter() - t0:.0f} s in all")
    assert 0.9 < single_auroc < 1.0  # the slice is neither too easy nor too hard
    assert abs(multi_auroc - single_auroc) <= AUROC_TOLERANCE
