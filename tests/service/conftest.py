"""Fixtures of the service tests: one tiny artifact per session, apps, a real server process.

The artifact is a dense autoencoder (32 hidden units, 4 latent) fitted for one epoch on 200
synthetic blob images: seconds on 2 CPU cores, and enough to exercise every route. Tests that
change a models directory get their own copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
METADATA = {"dataset": "blobs", "normal_classes": [0], "class_names": ["blob"]}


def blobs(n: int, seed: int = 0) -> np.ndarray:
    """Normal images: one soft Gaussian blob near the centre, float32 ``(n, 28, 28)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy, cx = 13.5 + rng.uniform(-3, 3, (2, n))
    s = rng.uniform(2.5, 4.0, n)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return np.exp(-d2 / (2 * s[:, None, None] ** 2)).astype(np.float32)


def bars(n: int, seed: int = 1) -> np.ndarray:
    """Anomalies: a bright bar across the image, float32 ``(n, 28, 28)``."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        pos = rng.integers(4, 22)
        img[i, pos : pos + 3, 2:26] = 1.0
    return img


@pytest.fixture(scope="session")
def detector():
    """The session's tiny fitted Detector (read-only)."""
    from anomaly.detector import Detector

    # mse+knn, not the default's +tp: one epoch on 200 blobs leaves the classifier at chance,
    # and these tests rank anomalies and watch metrics move, not the classifier.
    det = Detector("dense-ae", force_calibration=True, epochs=1, batch_size=32, hidden=[32],
                   latent_dim=4, score="mse+knn",
                   target_fprs=(0.01, 0.1))
    return det.fit(blobs(200))


def save_version(detector, root: Path, name: str, version: str) -> Path:
    """Write ``detector`` as the artifact ``root/name/version``."""
    return detector.save(root / name / version,
                         metadata={**METADATA, "name": name, "version": version})


@pytest.fixture(scope="session")
def onnx_root(detector, tmp_path_factory) -> Path:
    """``exported/v1`` (exported to ONNX, with its Keras files) and ``plain/v1`` (not)
    (read-only)."""
    from anomaly.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx-models")
    src = save_version(detector, root / "_src", "blobs", "v1")
    export_onnx(src, root / "exported" / "v1")
    save_version(detector, root, "plain", "v1")
    return root


def assert_close_scores(detector, got, want) -> None:
    """ONNX scores ``got`` within the export's tolerance of the detector's output ``want``:
    1e-5 relative on the score and its parts (the service's detector scores mse+knn; see
    anomaly.export.onnx.score_tolerance)."""
    from anomaly.export.onnx import score_tolerance

    diff = np.abs(np.asarray(got) - want.scores)
    assert (diff <= score_tolerance(detector, want.parts)).all(), (diff, want.scores)


@pytest.fixture(scope="session")
def models_root(detector, tmp_path_factory) -> Path:
    """A models directory with ``blobs/v1`` and ``blobs/v2`` (read-only)."""
    root = tmp_path_factory.mktemp("models")
    save_version(detector, root, "blobs", "v1")
    save_version(detector, root, "blobs", "v2")
    return root


@pytest.fixture
def models_copy(models_root, tmp_path) -> Path:
    """A private copy of the session models directory that a test may change."""
    dest = tmp_path / "models"
    shutil.copytree(models_root, dest)
    return dest


def wait_ready(client, timeout: float = 60.0) -> None:
    """Poll /readyz until 200 (models load in the background after start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').text}")


@contextlib.contextmanager
def running_app(models_dir: Path, *, ready: bool = True, **settings):
    """A TestClient of a fresh app on ``models_dir`` (lifespan run), optionally ready."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    # The admin routes are closed by default; most tests reload without keys.
    settings.setdefault("admin_open", True)
    app = create_app(Settings(models_dir=models_dir, **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(models_root) -> Iterator:
    """A ready TestClient on the session models directory (shared by a test module)."""
    with running_app(models_root, max_batch_images=8, max_body_bytes=256 * 1024,
                     max_image_pixels=256 * 256) as c:
        yield c


@pytest.fixture
def app_factory() -> Callable:
    """``app_factory(models_dir, **settings)``: a context manager of a fresh TestClient."""
    return running_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``anomaly serve`` process on 127.0.0.1."""

    @contextlib.contextmanager
    def serving(self) -> Iterator[Server]:
        """Ready, then stopped; its log must hold no traceback."""
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop()
            assert "Traceback" not in self.output(), self.output()

    def __init__(self, models_dir: Path, *, program: list[str] | None = None, **env: str):
        """``program``: the command up to ``serve`` (default: this interpreter and the
        checkout); another one (an installed ``anomaly serve``) runs without the checkout on
        its path, from the models directory's parent."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = models_dir.parent / f"server-{self.port}.log"
        argv, cwd, inherited = [sys.executable, "-m", "anomaly.cli", "serve"], REPO, os.environ
        if program is not None:
            argv, cwd = program, models_dir.parent
            inherited = {k: v for k, v in os.environ.items()
                         if k not in ("PYTHONPATH", "ANOMALY_RUNTIME")}
            env.setdefault("PYTHONPATH", "")
        environ = {**inherited, "ANOMALY_LOG_LEVEL": "warning", "ANOMALY_ACCESS_LOG": "false",
                   "ANOMALY_ADMIN_OPEN": "1", "PYTHONPATH": str(REPO), **env}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*argv, "--models", str(models_dir), "--host", "127.0.0.1", "--port",
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=environ)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        """SIGTERM (graceful shutdown), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(detector, tmp_path_factory) -> Iterator[Server]:
    """A real server process on its own models directory: ``blobs/v1`` and ``hot/v1``.

    Only the hot-reload test changes ``hot``; the others use ``blobs``.
    """
    root = tmp_path_factory.mktemp("served") / "models"
    save_version(detector, root, "blobs", "v1")
    save_version(detector, root, "hot", "v1")
    srv = Server(root)
    srv.root = root
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
        # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit too.
        assert rc in (0, -signal.SIGTERM), f"server exit status {rc}:\n{srv.output()}"
        assert "Traceback" not in srv.output(), srv.output()
