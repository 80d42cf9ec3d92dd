"""End to end on a small slice of real MNIST: the real ``anomaly`` command, and resuming a fit.

MNIST comes through the default cache ($ANOMALY_CACHE_DIR or the user cache dir): fetched on
first use, then reused.
"""

from __future__ import annotations

import json
import subprocess

import keras
import numpy as np
import pandas as pd
import pytest

from anomaly.artifact import verify
from anomaly.cli import main
from anomaly.config import default_of
from anomaly.detector import Detector
from anomaly.training import EpochBackup
from tests.conftest import error_line, make_blobs, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fit_run(mnist, tmp_path_factory):
    """``anomaly fit --normal-class 0`` on 2,000 training and 1,000 test images, 2 epochs."""
    out = tmp_path_factory.mktemp("e2e") / "models"
    proc = run_cli("fit", "--force-calibration", "--normal-class", "0", "--train-limit", "200", "--test-limit", "1000",
                   "--epochs", "2", "--output", out)
    assert proc.returncode == 0, proc.stderr
    return proc, out


@pytest.fixture(scope="module")
def artifact(fit_run):
    _, out = fit_run
    versions = list((out / "mnist-0-conv-vae").iterdir())
    assert len(versions) == 1, versions  # one artifact, no temporary or resume folders left
    return versions[0]


def test_fit_writes_a_verified_artifact(fit_run, artifact, mnist):
    proc, _ = fit_run
    assert (artifact / "manifest.json").is_file()
    files = verify(artifact)["files"]
    assert {"model.keras", "calibration.json", "metadata.json", "metrics.json", "per_class.csv",
            "config.yaml", "history.csv", "model.onnx", "onnx.json"} <= set(files)
    from anomaly.runtime import load_runtime

    # Every new artifact carries its ONNX export: it serves without TensorFlow, alike.
    x = mnist.x_test[:64]
    got = load_runtime(artifact, runtime="onnx").detect(x).scores
    np.testing.assert_allclose(got, Detector.load(artifact).decision_function(x), atol=1e-4)
    assert f"Artifact: {artifact}" in proc.stdout
    assert "AUROC" in proc.stdout and "fpr@1%*" in proc.stdout
    assert "Training conv-vae on" in proc.stderr and "epoch 2/2" in proc.stderr
    assert "Traceback" not in proc.stderr
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["dataset"] == "mnist" and meta["normal_classes"] == [0]
    assert meta["epochs_run"] == 2
    # Only class-0 training images, about a tenth of the 2,000, with the default hold-out.
    assert meta["n_train"] + meta["n_val"] == 200  # the limit counts normal images
    assert meta["n_val"] == round((meta["n_train"] + meta["n_val"]) * default_of(
        "val_fraction"))
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["n_test"] == 1000 and 800 < metrics["n_anomalies"] < 960
    assert metrics["auroc"] > 0.6  # 2 epochs on ~200 images: weak, but clearly not random
    per_class = pd.read_csv(artifact / "per_class.csv")
    assert per_class["class"].tolist() == list(range(10))
    assert per_class["role"].tolist() == ["normal"] + ["anomaly"] * 9


def test_models_lists_the_artifact(fit_run, artifact):
    _, out = fit_run
    proc = run_cli("models", out)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "mnist-0-conv-vae" in ln)
    assert artifact.name in line and "conv-vae" in line and str(artifact) in line


def test_evaluate(artifact, tmp_path):
    proc = run_cli("evaluate", artifact, "--test-limit", "500", "--output", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    assert "AUROC" in proc.stdout and "Per class" in proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_test"] == 500
    assert 0.6 < metrics["auroc"] <= 1.0
    assert set(metrics["operating_points"]) == {"fpr@1%", "fpr@5%"}  # the default targets


def test_score_matches_the_python_api(artifact, mnist, tmp_path):
    images = mnist.x_test[:64]
    np.save(tmp_path / "some.npy", images)
    proc = run_cli("score", artifact, "--input", tmp_path / "some.npy", "--output",
                   tmp_path / "scores.csv")
    assert proc.returncode == 0, proc.stderr
    assert "Scored 64 images" in proc.stdout
    df = pd.read_csv(tmp_path / "scores.csv")
    assert df.columns.tolist() == ["id", "score", "normalized_score", "is_anomaly"]
    assert df["id"].tolist() == list(range(64))
    # The runtime the command chose (onnxruntime: the artifact has an export); its agreement
    # with the Keras detector is the export's own check (tests/export, tests/service).
    from anomaly.runtime import load_runtime

    det = load_runtime(artifact)
    assert det.runtime_ == "onnx"
    out = det.detect(images)
    np.testing.assert_allclose(df["score"].to_numpy(), out.scores, rtol=1e-6, atol=0)
    np.testing.assert_allclose(df["normalized_score"].to_numpy(), out.normalized, atol=1e-12)
    np.testing.assert_array_equal(df["is_anomaly"].to_numpy(), out.is_anomaly)
    np.testing.assert_array_equal(out.scores, det.decision_function(images))


def test_real_command_errors_are_one_line(tmp_path):
    # In a real process TensorFlow's start-up log lines would reach stderr too: the error must
    # still be the only line there.
    proc = run_cli("fit", "--normal-class", "10", "--output", tmp_path)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "Expected class indices in 0..9. Received: 10" in line
    assert proc.stderr.strip() == line and proc.stdout == ""
    proc = run_cli("score", tmp_path / "missing", "--input", tmp_path / "x.npy", "--output",
                   tmp_path / "s.csv")
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "Expected an artifact directory" in line and "Received:" in line
    assert proc.stderr.strip() == line and proc.stdout == ""


def test_data_fetch_reports_the_verified_cache(mnist, capsys):
    assert main(["data", "fetch", "--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "mnist: 60000 training + 10000 test images, verified" in out
    assert "Cache:" in out


class _Interrupt(keras.callbacks.Callback):
    """Ctrl-C at the end of the first epoch (after its state was saved)."""

    def on_epoch_end(self, epoch, logs=None):
        self.weights = [w.copy() for w in self.model.get_weights()]
        raise KeyboardInterrupt


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []

    def on_train_begin(self, logs=None):
        self.start_weights = [w.copy() for w in self.model.get_weights()]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_interrupted_fit_resumes_from_its_last_epoch(mnist, tmp_path):
    x = mnist.x_train[mnist.y_train == 0][:300]
    params = {"hidden": [8, 16], "latent_dim": 4, "epochs": 3, "batch_size": 64, "seed": 0}
    backup = tmp_path / "backup"
    interrupt = _Interrupt()
    with pytest.raises(KeyboardInterrupt):
        Detector("conv-ae", force_calibration=True, **params).fit(x, backup_dir=backup, callbacks=[interrupt])
    assert any(backup.iterdir())  # the state of epoch 1 is on disk

    recorder = _Recorder()
    det = Detector("conv-ae", force_calibration=True, **params).fit(x, backup_dir=backup, callbacks=[recorder])
    assert recorder.epochs == [1, 2]  # epoch 0 was not run again
    assert len(det.history_["loss"]) == 3  # the history holds the epoch from before, too
    # Training started from the weights saved at the interruption, not from a fresh init.
    for restored, saved in zip(recorder.start_weights, interrupt.weights, strict=True):
        np.testing.assert_array_equal(restored, saved)
    assert not backup.exists() or not any(backup.iterdir())  # state removed after success


def test_interrupted_cli_fit_resumes(mnist, tmp_path, capsys, monkeypatch):
    """``anomaly fit`` killed after epoch 1 leaves no artifact; the same command resumes."""
    out = tmp_path / "models"
    argv = ["fit", "--force-calibration", "--normal-class", "0", "--train-limit", "100", "--test-limit", "200",
            "--epochs", "2", "--hidden", "8,16", "--latent-dim", "4", "--output", str(out)]
    original = EpochBackup.on_epoch_end

    def save_then_interrupt(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(EpochBackup, "on_epoch_end", save_then_interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was written" in err and "epoch 1/2" not in err
    folder = out / "mnist-0-conv-vae"
    assert [p.name[:8] for p in folder.iterdir()] == [".resume-"]  # no artifact, only state
    monkeypatch.undo()

    assert main(argv) == 0
    stdout, err = capsys.readouterr()
    assert "Resuming from the state in" in err
    assert "epoch 2/2" in err and "epoch 1/2" not in err  # only the second epoch ran
    artifacts = list(folder.iterdir())
    assert len(artifacts) == 1 and not artifacts[0].name.startswith(".")  # state cleaned up
    verify(artifacts[0])
    assert f"Artifact: {artifacts[0]}" in stdout


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills up during a fit (needs root, as in CI)."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_ends_with_one_error_line_and_nothing_half_written(full_disk, tmp_path):
    np.save(tmp_path / "blobs.npy", make_blobs(200))
    proc = run_cli("fit", "--dataset", tmp_path / "blobs.npy", "--model", "dense-ae",
                   "--hidden", "32", "--latent-dim", "4", "--epochs", "2",
                   "--force-calibration", "--output", full_disk / "models", "--no-report")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # not SIGSEGV (-11)
    line = error_line(proc.stderr)
    assert "no space left on device" in line
    leftovers = [p for p in (full_disk / "models").rglob("*") if p.is_file()]
    assert leftovers == []  # no artifact, no resume state, no temporary directory
