"""Training glue: seeding, the optimizer, early stopping and resumable ``fit``.

The network and its loss live in :mod:`anomaly.models`; this module only runs Keras ``fit`` on
normal images with early stopping on the normal validation loss, under a ``tf.distribute``
strategy: one device by default, ``MirroredStrategy`` over the GPUs of one machine, or
``MultiWorkerMirroredStrategy`` across machines described by ``TF_CONFIG``. A run given a ``backup_dir``
saves its state at the end of every epoch (``keras.callbacks.BackupAndRestore``): a run killed
part-way and started again with the same ``backup_dir`` resumes from its last finished epoch.
"""

from __future__ import annotations

from anomaly._tf import tf  # first: TensorFlow without its start-up noise

# isort: split

import json
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

from anomaly.data.images import with_channels
from anomaly.errors import ConfigError, expected
from anomaly.models.autoencoder import Autoencoder


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; make TF ops deterministic where they can be."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


STRATEGIES = ("auto", "none", "mirrored", "multi-worker")


def choose_strategy(requested: str = "auto", *, env: dict | None = None,
                    n_gpus: int | None = None) -> str:
    """Which ``tf.distribute`` strategy a fit uses.

    ``auto``: ``multi-worker`` when ``TF_CONFIG`` names a cluster of more than one task,
    ``mirrored`` with more than one local GPU, else ``none`` (the default one-device strategy).
    """
    if requested not in STRATEGIES:
        raise expected(f"a strategy in {STRATEGIES}", repr(requested), cls=ConfigError)
    if requested != "auto":
        return requested
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
        except (json.JSONDecodeError, AttributeError):
            raise expected("TF_CONFIG as JSON with a 'cluster' and a 'task'", raw[:80],
                           cls=ConfigError) from None
        if sum(len(v) for v in cluster.values() if isinstance(v, list)) > 1:
            return "multi-worker"
    if n_gpus is None:
        n_gpus = len(tf.config.list_logical_devices("GPU"))
    return "mirrored" if n_gpus > 1 else "none"


def is_chief(env: dict | None = None) -> bool:
    """True unless ``TF_CONFIG`` makes this process a non-chief worker of a cluster.

    The chief is the ``chief`` task, or worker 0 when the cluster has no ``chief``; only it
    writes the artifact, as ``MultiWorkerMirroredStrategy`` expects.
    """
    env = os.environ if env is None else env
    try:
        tf_config = json.loads(env.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError:
        return True
    task = tf_config.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {})


def make_strategy(kind: str, devices: list[str] | None = None) -> tf.distribute.Strategy:
    """The strategy object for a :func:`choose_strategy` result."""
    if kind == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


class _EpochLog(keras.callbacks.Callback):
    """One line per epoch on stderr: where no Keras bar is drawn (logs, CI), or with ``-v``.

    ``full`` lists every metric Keras logged; otherwise the losses that tell whether training
    converges. Each line ends with the epoch's wall time, which a log otherwise lacks.
    """

    def __init__(self, epochs: int, *, full: bool = False):
        super().__init__()
        self.epochs = epochs
        self.full = full
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        keep = logs if self.full else [k for k in logs if k in ("loss", "val_loss", "kl_loss")]
        parts = [f"{k} {float(logs[k]):.4g}" for k in keep]
        print(f"epoch {epoch + 1}/{self.epochs}: " + ", ".join(parts)
              + f" ({time.perf_counter() - self._t0:.1f} s)", file=sys.stderr, flush=True)


def train(model: Autoencoder, x_train: np.ndarray, x_val: np.ndarray, *, epochs: int,
          batch_size: int, learning_rate: float, patience: int,
          backup_dir: str | Path | None = None, verbose: int = 1,
          callbacks: list[keras.callbacks.Callback] | tuple = ()) -> dict[str, list[float]]:
    """Fit ``model`` on normal images with early stopping on the validation loss.

    Args:
        model: an un-trained :class:`Autoencoder`.
        x_train: normal training images ``(n_train, H, W[, C])`` float32 in [0, 1].
        x_val: normal validation images ``(n_val, H, W[, C])``.
        backup_dir: folder for per-epoch state; an existing state there is resumed.
        verbose: 0 silent, 1 progress (a bar on a terminal, a line per epoch otherwise; with
            :func:`anomaly.progress.set_verbosity` (2) a full line per epoch in both).

    Returns:
        The Keras history: per-epoch lists for ``loss``, ``val_loss``, ``reconstruction_loss``,
        ``kl_loss``, their ``val_`` twins, and ``epoch`` (1-based, counting resumed epochs). The model holds the best (lowest ``val_loss``)
        weights on return.
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    cbs: list = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                               restore_best_weights=True)]
    if backup_dir is not None:
        os.makedirs(backup_dir, exist_ok=True)
        cbs.append(keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=True))
    from anomaly.progress import VERBOSE, is_tty, verbosity

    keras_verbose = 0
    if verbose:
        # Keras' own bar on a terminal; plain lines in logs, and with -v in both.
        if is_tty():
            keras_verbose = 1
        if not is_tty() or verbosity() >= VERBOSE:
            cbs.append(_EpochLog(epochs, full=verbosity() >= VERBOSE))
    cbs.extend(callbacks)
    # Our own tf.data pipeline: a seeded shuffle, and no map stage (Keras' array adapter adds
    # one whose op attributes make TF 2.21 log a spurious error line).
    seed = int(model.seed or 0)
    x_train, x_val = with_channels(x_train), with_channels(x_val)
    train_ds = (tf.data.Dataset.from_tensor_slices(np.asarray(x_train, np.float32))
                .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
                .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices(np.asarray(x_val, np.float32)).batch(batch_size)
    hist = model.fit(train_ds, epochs=epochs, validation_data=val_ds, callbacks=cbs,
                     verbose=keras_verbose, shuffle=False)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    # Absolute epoch numbers: a resumed run starts after the epochs restored from backup_dir.
    history["epoch"] = [float(e + 1) for e in hist.epoch]
    return history
