"""Strategy selection for tf.distribute, a fit under a one-device MirroredStrategy, and the
per-epoch training state that a killed fit resumes from (per worker of a cluster).

Two real workers on loopback: tests/test_training_multiworker.py.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from anomaly.errors import AnomalyError, ConfigError
from anomaly.training import (
    STATE_FILE,
    choose_strategy,
    common_epoch,
    is_chief,
    lost_worker_error,
    make_strategy,
    read_state,
    resume_point,
    train,
    worker_backup_dir,
)


def _tf_config(n_workers: int, task_type: str = "worker", index: int = 0, chief: bool = False):
    cluster = {"worker": [f"w{i}:2222" for i in range(n_workers)]}
    if chief:
        cluster["chief"] = ["c0:2222"]
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": task_type, "index": index}})}


@pytest.mark.parametrize(("env", "n_gpus", "want"), [
    ({}, 0, "none"),
    ({}, 1, "none"),
    ({}, 4, "mirrored"),
    (_tf_config(2), 0, "multi-worker"),
    (_tf_config(1), 0, "none"),            # a one-task cluster is no cluster
    (_tf_config(1, chief=True), 0, "multi-worker"),
    (_tf_config(3), 8, "multi-worker"),    # TF_CONFIG wins over local GPUs
])
def test_auto_strategy(env, n_gpus, want):
    assert choose_strategy("auto", env=env, n_gpus=n_gpus) == want


def test_explicit_strategy_wins_and_unknown_is_refused():
    assert choose_strategy("none", env=_tf_config(4), n_gpus=8) == "none"
    assert choose_strategy("mirrored", env={}, n_gpus=0) == "mirrored"
    with pytest.raises(ConfigError, match=r"Expected a strategy in .* Received: 'tpu'"):
        choose_strategy("tpu")


def test_bad_tf_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="Expected TF_CONFIG as JSON"):
        choose_strategy("auto", env={"TF_CONFIG": "{not json"}, n_gpus=0)


@pytest.mark.parametrize(("env", "want"), [
    ({}, True),
    (_tf_config(2, "worker", 0), True),
    (_tf_config(2, "worker", 1), False),
    (_tf_config(2, "worker", 0, chief=True), False),
    (_tf_config(2, "chief", 0, chief=True), True),
])
def test_only_the_chief_writes(env, want):
    assert is_chief(env) is want


def test_fit_under_one_device_mirrored_strategy(normal_images, anomaly_images):
    """MirroredStrategy over the CPU alone runs the same code path as several GPUs."""
    import tensorflow as tf

    from anomaly import Detector
    from anomaly.models import Autoencoder
    from anomaly.training import train

    strategy = make_strategy("mirrored", devices=["/cpu:0"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    with strategy.scope():
        model = Autoencoder("dense-ae", (28, 28, 1), latent_dim=4, hidden=[32], seed=0)
        history = train(model, normal_images[:200], normal_images[200:], epochs=2,
                        batch_size=32, learning_rate=1e-3, patience=2, verbose=0)
    assert len(history["loss"]) == 2 and np.isfinite(history["val_loss"]).all()
    det = Detector("dense-ae", force_calibration=True, latent_dim=4, hidden=[32], epochs=1, batch_size=32)
    det.fit(normal_images, distribute="none")
    assert det.strategy_ == "none"
    assert det.decision_function(anomaly_images).shape == (len(anomaly_images),)


def test_each_worker_of_a_cluster_keeps_its_state_in_its_own_folder(tmp_path):
    assert worker_backup_dir(tmp_path, env={}) == tmp_path
    assert worker_backup_dir(tmp_path, env=_tf_config(1)) == tmp_path  # a one-task cluster
    assert worker_backup_dir(tmp_path, env=_tf_config(2, "worker", 0)) == tmp_path / "worker-0"
    assert worker_backup_dir(tmp_path, env=_tf_config(2, "worker", 1)) == tmp_path / "worker-1"
    # With a chief, worker 0 is not the chief: the task type tells their folders apart.
    assert (worker_backup_dir(tmp_path, env=_tf_config(2, "chief", 0, chief=True))
            == tmp_path / "chief-0")
    with pytest.raises(ConfigError, match="Expected TF_CONFIG as JSON"):
        worker_backup_dir(tmp_path, env={"TF_CONFIG": '{"cluster": [], "task": {}}'})


@pytest.mark.parametrize(("held", "want"), [
    ([[3, 2]], 3),                # one machine: its last epoch
    ([[3, 2], [3, 2]], 3),
    ([[3, 2], [2, 1]], 2),        # worker 1 was killed while it saved epoch 3
    ([[2, 1], [3, 2], [3, 2]], 2),
    ([[3, 2], [0, 0]], 0),        # worker 1 lost its state (or had none yet): all start over
    ([[5, 4], [2, 1]], 0),        # not one run's states: start over rather than mix them
])
def test_workers_resume_from_the_last_epoch_all_of_them_saved(held, want):
    assert common_epoch(held) == want


def _model():
    from anomaly.models import Autoencoder

    return Autoencoder("dense-ae", (28, 28, 1), latent_dim=4, hidden=[32], seed=0)


class _KillAfter(keras.callbacks.Callback):
    """A kill at the end of epoch ``n`` (after the state of that epoch was saved)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.n:
            raise KeyboardInterrupt


_FIT = {"batch_size": 32, "learning_rate": 1e-3, "verbose": 0}


def test_the_state_names_only_whole_files_and_keeps_the_epoch_before(normal_images, tmp_path):
    x, x_val = normal_images[:200], normal_images[200:]
    with pytest.raises(KeyboardInterrupt):
        train(_model(), x, x_val, epochs=4, patience=4, backup_dir=tmp_path,
              callbacks=[_KillAfter(3)], **_FIT)
    state = read_state(tmp_path)
    assert state["epoch"] == 3 and state["previous"]["epoch"] == 2
    assert state["previous"].get("previous") is None  # one epoch back, no chain
    assert len(state["history"]["val_loss"]) == 3
    named = {r["weights"] for r in (state, state["previous"])}
    named |= {r["early_stopping"]["best_weights"] for r in (state, state["previous"])}
    # Epoch 1's files went once epoch 3 was saved; nothing half-written is left.
    assert {p.name for p in tmp_path.iterdir()} == named | {STATE_FILE}
    assert resume_point(tmp_path)["epoch"] == 3


def test_a_resumed_fit_keeps_the_early_stopping_record_and_the_history(normal_images, tmp_path):
    """Keras' own early stopping starts afresh on a resumed run: it would forget a better
    epoch before the kill, wait longer than its patience and end on worse weights."""
    x, x_val = normal_images[:200], normal_images[200:]
    with pytest.raises(KeyboardInterrupt):
        train(_model(), x, x_val, epochs=8, patience=2, backup_dir=tmp_path,
              callbacks=[_KillAfter(2)], **_FIT)
    # Make the best epoch so far one that no later epoch beats.
    state = json.loads((tmp_path / STATE_FILE).read_text())
    best = state["early_stopping"]
    best.update(best=-1.0, wait=0)
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    with np.load(tmp_path / best["best_weights"]) as saved:
        best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    model = _model()
    history = train(model, x, x_val, epochs=8, patience=2, backup_dir=tmp_path, **_FIT)
    assert history["epoch"] == [1.0, 2.0, 3.0, 4.0]  # two epochs without a better one: stop
    assert history["val_loss"][:2] == state["history"]["val_loss"]
    for restored, saved in zip(model.get_weights(), best_weights, strict=True):
        np.testing.assert_array_equal(restored, saved)
    assert not tmp_path.exists()  # the state goes once training ends


def test_a_state_saved_after_early_stopping_ended_training_trains_no_further(normal_images,
                                                                                tmp_path):
    x, x_val = normal_images[:200], normal_images[200:]
    with pytest.raises(KeyboardInterrupt):
        train(_model(), x, x_val, epochs=8, patience=2, backup_dir=tmp_path,
              callbacks=[_KillAfter(2)], **_FIT)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    state["early_stopping"]["stopped"] = True
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    history = train(_model(), x, x_val, epochs=8, patience=2, backup_dir=tmp_path, **_FIT)
    assert history["epoch"] == [1.0, 2.0]
    assert history["loss"] == state["history"]["loss"]


def test_an_unreadable_state_is_ignored_not_fatal(tmp_path, caplog):
    (tmp_path / STATE_FILE).write_text("{half a state")
    assert resume_point(tmp_path) is None
    assert "unreadable" in caplog.text


def test_a_lost_worker_is_one_error_line():
    import tensorflow as tf

    message = ("{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/"
               "task:0/device:CPU:0}} Collective ops is aborted by: Error reported from "
               "/job:worker/task:1: The following tasks are unhealthy (stopped sending "
               "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. Check the "
               "task logs for an earlier error.\n [Op:CollectiveReduceV2]")
    err = lost_worker_error(tf.errors.UnavailableError(None, None, message))
    assert isinstance(err, AnomalyError)
    assert str(err) == (
        "Expected every worker of the TF_CONFIG cluster to stay up until training ends. "
        "Received: UnavailableError: Error reported from /job:worker/task:1: The following tasks "
        "are unhealthy (stopped sending heartbeats): /job:worker/replica:0/task:1. Start every "
        "worker again: training resumes from the last epoch all of them saved")


# -- training images streamed from disk --------------------------------------------------------


def _png_folder(folder, images) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def test_a_streamed_fit_is_the_in_memory_fit(normal_images, tmp_path):
    """The same seed gives the same fit, to the bit: the stream shuffles the images' positions
    with the op, seed and buffer the in-memory pipeline shuffles the images with, so every
    batch holds the same pixels in the same order, and the scores after training are
    independent of their batches (anomaly.scoring). mse+knn with a kNN memory smaller than
    the training set covers the seeded sample of codes and the standardizer."""
    from anomaly.config import resolve
    from anomaly.data.prepare import prepare
    from anomaly.data.stream import DiskImages
    from tests.conftest import tiny_detector

    _png_folder(tmp_path / "d", normal_images[:120])
    fitted = {}
    for stream in ("never", "always"):
        split = prepare(resolve(None, {"dataset": str(tmp_path / "d"), "stream": stream}))
        assert isinstance(split.x_train, DiskImages) is (stream == "always")
        det = tiny_detector("dense-ae", score="mse+knn", knn_memory=40, epochs=3, batch_size=16)
        fitted[stream] = det.fit(split.x_train, x_val=split.x_val)
    a, b = fitted["never"], fitted["always"]
    assert a.history_ == b.history_
    assert np.array_equal(a.knn_.memory, b.knn_.memory) and len(b.knn_.memory) == 40
    assert a.standardizer_ == b.standardizer_
    assert a.calibration_.to_dict() == b.calibration_.to_dict()
    assert np.array_equal(a.decision_scores_, b.decision_scores_)
    assert np.array_equal(a.decision_function(normal_images[200:]),
                          b.decision_function(normal_images[200:]))


def test_fit_holds_out_from_disk_images_by_the_one_rule(normal_images, tmp_path):
    """Detector.fit without x_val holds out the same images from DiskImages as from the
    array (splits.holdout), and scores a stream block by block."""
    from anomaly.data.stream import open_images
    from tests.conftest import tiny_detector

    _png_folder(tmp_path / "d", normal_images[:60])
    disk = open_images(tmp_path / "d").images
    a = tiny_detector("dense-ae", epochs=1).fit(disk.load())
    b = tiny_detector("dense-ae", epochs=1).fit(disk)
    assert a.history_ == b.history_
    assert np.array_equal(a.decision_function(disk.load()), b.decision_function(disk))


def test_a_file_that_goes_bad_during_training_is_its_own_error(normal_images, tmp_path):
    from anomaly.data.stream import open_images
    from anomaly.errors import DataError
    from tests.conftest import tiny_detector

    _png_folder(tmp_path / "d", normal_images[:40])
    disk = open_images(tmp_path / "d").images
    (tmp_path / "d" / "007.png").write_bytes(b"truncated")  # after the scan
    with pytest.raises(DataError, match=r"007\.png to be a PNG, JPEG or other image file"):
        tiny_detector("dense-ae", epochs=1).fit(disk)


def test_a_streamed_fit_reads_no_more_than_a_batch_or_a_block_at_once(normal_images, tmp_path,
                                                                      monkeypatch):
    """Training reads a batch at a time, and the kNN codes, the standardizer, calibration and
    the training scores a block at a time: nothing holds the training set in memory."""
    from anomaly.data import stream
    from tests.conftest import tiny_detector

    _png_folder(tmp_path / "d", normal_images[:100])
    monkeypatch.setattr(stream, "MAX_BLOCK_ROWS", 24)
    reads = []
    read = stream.DiskImages.read
    monkeypatch.setattr(stream.DiskImages, "read",
                        lambda self, positions: reads.append(len(positions)) or read(self,
                                                                                    positions))
    monkeypatch.setattr(stream.DiskImages, "load", None)  # would hold them all
    det = tiny_detector("dense-ae", score="mse+knn", knn_memory=30, batch_size=16)
    det.fit(stream.open_images(tmp_path / "d").images)
    assert max(reads) == 24 and len(det.knn_.memory) == 30
    assert sum(reads) >= 2 * 90 + 100  # two epochs, then the scores


@pytest.mark.parametrize(("flags", "n_gpus", "env", "want"), [
    ({"avx512f", "amx_bf16", "amx_tile"}, 0, {}, "bfloat16"),
    ({"avx512f", "avx512_bf16"}, 0, {}, "bfloat16"),  # bfloat16 dot products (AMD EPYC)
    ({"avx512f", "avx512_vnni"}, 0, {}, "float32"),  # AVX-512 without bfloat16
    ({"avx2"}, 0, {}, "float32"),
    ({"amx_bf16"}, 1, {}, "float32"),                 # GPUs: not measured, left at float32
    ({"amx_bf16"}, 0, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32"),  # no oneDNN, no AMX kernels
    (set(), 0, {}, "float32"),                        # flags unknown (not Linux)
])
def test_auto_precision(flags, n_gpus, env, want):
    from anomaly.training import choose_precision

    assert choose_precision("auto", flags=frozenset(flags), n_gpus=n_gpus, env=env) == want


def test_explicit_precision_wins_and_unknown_is_refused():
    from anomaly.training import choose_precision

    assert choose_precision("bfloat16", flags=frozenset(), n_gpus=0, env={}) == "bfloat16"
    assert choose_precision("float32", flags=frozenset({"amx_bf16"}), n_gpus=0,
                            env={}) == "float32"
    with pytest.raises(ConfigError, match=r"Expected a precision in .* Received: 'fp16'"):
        choose_precision("fp16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from anomaly.training import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 amx_bf16 avx512f\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "amx_bf16", "avx512f"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_a_bfloat16_fit_scores_and_saves_a_float32_model(normal_images, anomaly_images,
                                                         tmp_path):
    """Mixed bfloat16 trains; the detector keeps a float32 twin with the very same weights,
    and that is what scores, saves and loads."""
    from anomaly import Detector
    from anomaly.models import Autoencoder
    from anomaly.training import dtype_policy, float32_twin

    with dtype_policy("bfloat16"):
        mixed = Autoencoder("conv-vae", (28, 28, 1), latent_dim=4, hidden=[8, 16], seed=0)
    assert mixed.dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # restored
    twin = float32_twin(mixed)
    assert twin.dtype_policy.name == "float32" and float32_twin(twin) is twin
    for a, b in zip(mixed.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = normal_images[:8, ..., None]
    low = np.asarray(mixed(x), np.float32)
    full = np.asarray(twin(x))
    assert full.dtype == np.float32
    np.testing.assert_allclose(low, full, atol=0.05)  # bfloat16 keeps ~3 significant digits

    det = Detector("conv-vae", latent_dim=4, hidden=[8, 16], epochs=2, batch_size=32,
                   precision="bfloat16", force_calibration=True).fit(normal_images)
    assert det.precision_ == "bfloat16" and det.model_.dtype_policy.name == "float32"
    scores = det.decision_function(np.concatenate([normal_images[:32], anomaly_images[:32]]))
    assert scores.dtype == np.float64 and np.isfinite(scores).all()
    assert scores[32:].mean() > scores[:32].mean()
    loaded = Detector.load(det.save(tmp_path / "m"))
    assert loaded.model_.dtype_policy.name == "float32"
    np.testing.assert_allclose(loaded.decision_function(anomaly_images[:8]),
                               det.decision_function(anomaly_images[:8]), rtol=1e-6)
