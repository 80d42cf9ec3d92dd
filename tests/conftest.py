"""Shared fixtures: tiny synthetic images, tiny trained detectors, a saved artifact, the CLI.

Synthetic data: "normal" images are one soft Gaussian blob near the centre; "anomalies" are a
straight bar across the image. Both are float32 (N, 28, 28) in [0, 1], generated with NumPy, so
every unit test runs in seconds without real data. Anything trained more than once is
session-scoped and must not be mutated by tests (copy it first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Hyper-parameters that keep each model of the registry tiny (seconds to train on 2 CPUs).
# The score settings are the plain per-model ones (mse for the autoencoders, elbo for the VAEs,
# one operating point), so that unit tests check each score against a NumPy re-computation;
# tests of the recommended default (mse+knn, top10) say so.
# A few hundred images cannot resolve fpr@1% (it needs 499 normal reference images): forced.
_PLAIN = {"aggregation": "mean", "target_fprs": [0.01], "force_calibration": True}
TINY = {
    "dense-ae": {"hidden": [32], "latent_dim": 4, "score": "mse", **_PLAIN},
    "conv-ae": {"hidden": [8, 16], "latent_dim": 4, "score": "mse", **_PLAIN},
    "vae": {"hidden": [32], "latent_dim": 2, "score": "elbo", **_PLAIN},
    "conv-vae": {"hidden": [8, 16], "latent_dim": 2, "score": "elbo", **_PLAIN},
    "affine-vae": {"hidden": [8, 16], "latent_dim": 2, "score": "elbo", **_PLAIN},
}


def make_blobs(n: int, seed: int = 0) -> np.ndarray:
    """Normal images: a Gaussian blob (random centre +-3 px, width 2.5-4 px), ``(n, 28, 28)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy = 13.5 + rng.uniform(-3, 3, n)
    cx = 13.5 + rng.uniform(-3, 3, n)
    s = rng.uniform(2.5, 4.0, n)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    img = np.exp(-d2 / (2 * s[:, None, None] ** 2))
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def make_bars(n: int, seed: int = 1) -> np.ndarray:
    """Anomalies: a 2-3 px wide horizontal or vertical bar across the image, ``(n, 28, 28)``."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        pos, width = rng.integers(4, 22), rng.integers(2, 4)
        if rng.random() < 0.5:
            img[i, pos : pos + width, 2:26] = 1.0
        else:
            img[i, 2:26, pos : pos + width] = 1.0
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def tiny_detector(model: str = "dense-ae", **kwargs):
    from anomaly.detector import Detector

    params = {"epochs": 2, "batch_size": 32, "seed": 0, **TINY[model], **kwargs}
    return Detector(model, **params)


@pytest.fixture(scope="session")
def normal_images() -> np.ndarray:
    return make_blobs(256, seed=0)


@pytest.fixture(scope="session")
def normal_test_images() -> np.ndarray:
    return make_blobs(64, seed=10)


@pytest.fixture(scope="session")
def anomaly_images() -> np.ndarray:
    return make_bars(64, seed=1)


@pytest.fixture(scope="session")
def fitted(normal_images):
    """``fitted(model)``: a tiny detector of that type trained once per session (read-only)."""
    cache: dict = {}

    def get(model: str):
        if model not in cache:
            cache[model] = tiny_detector(model).fit(normal_images)
        return cache[model]

    return get


@pytest.fixture(scope="session")
def dense_detector(fitted):
    return fitted("dense-ae")


@pytest.fixture(scope="session")
def saved_artifact(dense_detector, tmp_path_factory) -> Path:
    """A dense-ae artifact at ``ROOT/blobs/1`` (read-only: copy it before changing it)."""
    path = tmp_path_factory.mktemp("models") / "blobs" / "1"
    dense_detector.save(path, metadata={"dataset": "blobs", "normal_classes": [0]})
    return path


@pytest.fixture
def artifact_copy(saved_artifact, tmp_path) -> Path:
    """A private copy of the session artifact that a test may damage."""
    dest = tmp_path / "copy" / "1"
    shutil.copytree(saved_artifact, dest)
    return dest


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST through the default cache ($ANOMALY_CACHE_DIR or the user cache dir)."""
    from anomaly.data.builtin import load_dataset

    return load_dataset("mnist")


def anomaly_command() -> list[str]:
    """The installed console script next to this Python, else ``python -m anomaly.cli``."""
    script = Path(sys.executable).parent / "anomaly"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "anomaly.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``anomaly`` command in a subprocess and capture its output."""
    return subprocess.run([*anomaly_command(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command; fails the test on a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected exactly one 'error:' line, got:\n{stderr}"
    return lines[0]
