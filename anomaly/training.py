"""Training glue: seeding, the optimizer, early stopping and resumable ``fit``.

The network and its loss live in :mod:`anomaly.models`; this module only runs Keras ``fit`` on
normal images with early stopping on the normal validation loss, under a ``tf.distribute``
strategy: one device by default, ``MirroredStrategy`` over the GPUs of one machine, or
``MultiWorkerMirroredStrategy`` across machines described by ``TF_CONFIG``. A run given a ``backup_dir``
saves its state at the end of every epoch (:class:`EpochBackup`): a run killed part-way and
started again with the same ``backup_dir`` resumes from its last finished epoch, early stopping
and history included. Each worker of a cluster keeps its own state, in a sub-folder of
``backup_dir`` (:func:`worker_backup_dir`), and the workers agree on the epoch they resume from.
"""

from __future__ import annotations

from anomaly._tf import tf  # first: TensorFlow without its start-up noise

# isort: split

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import keras
import numpy as np

from anomaly.config import PRECISIONS
from anomaly.data.images import with_channels
from anomaly.data.stream import DiskImages
from anomaly.errors import AnomalyError, ConfigError, expected
from anomaly.models.autoencoder import Autoencoder

_log = logging.getLogger(__name__)


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; make TF ops deterministic where they can be."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere or when unreadable)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def choose_precision(requested: str = "auto", *, flags: frozenset[str] | None = None,
                     n_gpus: int | None = None, env: dict | None = None) -> str:
    """The arithmetic a fit trains in: ``float32`` or ``bfloat16`` (Keras' ``mixed_bfloat16``).

    ``auto`` picks ``bfloat16`` only where it was measured to pay: a machine without a GPU
    whose CPU has native bfloat16 matrix arithmetic, with oneDNN on (TensorFlow's default on
    x86 Linux). With AMX's tiles (``amx_bf16``, Intel) the default conv-vae trained 1.5x faster
    per epoch (1.08 s against 1.64 s, ``bench/epoch_timing.py --compare precision``) at the same
    AUROC (README "Benchmarks"); with AVX-512's bfloat16 dot products (``avx512_bf16``, an AMD
    EPYC) 1.33x (1.92 s against 2.56 s), MNIST 2 and 8 over seeds 0-2 0.9880 / 0.9541 against
    0.9875 / 0.9538 (``bench/results/mnist-hard-precision-amd-*``). Without either the CPU would
    emulate it, slower than float32; GPUs are left at float32 (not measured here).
    """
    if requested not in PRECISIONS:
        raise expected(f"a precision in {PRECISIONS}", repr(requested), cls=ConfigError)
    if requested != "auto":
        return requested
    env = os.environ if env is None else env
    if env.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() in ("0", "false"):
        return "float32"
    if n_gpus is None:
        # Physical, not logical, devices: listing logical ones initializes TensorFlow's
        # context, after which a MultiWorkerMirroredStrategy can no longer be created.
        n_gpus = len(tf.config.list_physical_devices("GPU"))
    if n_gpus:
        return "float32"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build models under ``precision``'s Keras dtype policy (restored on exit)."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def float32_twin(model: Autoencoder) -> Autoencoder:
    """A float32 copy of a model trained under another policy, with its weights (variables
    are float32 under a mixed policy, so the copy is exact): what scores and is saved.

    Compiled with the same optimizer configuration, as the model a float32 fit returns is;
    the optimizer's slots are not copied (nothing reads them after training). Seed generators
    start afresh, as in a model loaded from its artifact.
    """
    if model.dtype_policy.name == "float32":
        return model
    with dtype_policy("float32"):
        twin = Autoencoder.from_config(model.get_config() | {"dtype": "float32"})
    twin.set_weights(model.get_weights())
    if getattr(model, "optimizer", None) is not None:  # an uncompiled model has none
        twin.compile(optimizer=type(model.optimizer).from_config(model.optimizer.get_config()))
    return twin


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
    if cluster_task(env) is not None:
        return "multi-worker"
    if n_gpus is None:
        n_gpus = len(tf.config.list_logical_devices("GPU"))
    return "mirrored" if n_gpus > 1 else "none"


def cluster_task(env: dict | None = None) -> tuple[str, int] | None:
    """This process's task ``(type, index)`` when ``TF_CONFIG`` names a cluster of more than one
    task, else ``None``."""
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        cluster = tf_config.get("cluster", {})
        n_tasks = sum(len(v) for v in cluster.values() if isinstance(v, list))
        task = tf_config.get("task") or {}
        kind, index = str(task.get("type", "worker")), int(task.get("index", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise expected("TF_CONFIG as JSON with a 'cluster' and a 'task'", raw[:80],
                       cls=ConfigError) from None
    return (kind, index) if n_tasks > 1 else None


def worker_backup_dir(backup_dir: str | Path, env: dict | None = None) -> Path:
    """The folder of this process's own training state under ``backup_dir``.

    ``backup_dir`` itself on one machine; ``backup_dir/TYPE-INDEX`` (``worker-1``) for a task of
    a ``TF_CONFIG`` cluster: the workers of one run share ``backup_dir`` (a shared volume), and
    each writing the same files would have them race on them.
    """
    task = cluster_task(env)
    return Path(backup_dir) if task is None else Path(backup_dir) / f"{task[0]}-{task[1]}"


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
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # TensorFlow's coordination service takes SIGTERM for preemption notices that nothing
        # here reads, and so ignores it (measured: a worker sent SIGTERM trained on to the end).
        # A deleted or evicted pod must stop at once, as when killed: its state is on disk.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return strategy
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


#: A worker's training state, in its backup folder (see :class:`EpochBackup`).
STATE_FILE = "state.json"
_STATE_FORMAT = 1


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on ``val_loss`` with the best weights restored, whose record (best
    loss, its epoch and weights, the epochs waited) a resumed run carries on with: Keras' own
    starts afresh, so a resumed run would forget a better epoch before the kill, wait longer
    than ``patience`` and end on worse weights."""

    def __init__(self, patience: int):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
        self.resumed: tuple[dict, list[np.ndarray] | None] | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resumed is not None:
            record, weights = self.resumed
            self.best, self.best_epoch, self.wait = (record["best"], record["best_epoch"],
                                                     record["wait"])
            self.best_weights = weights


class EpochBackup(keras.callbacks.Callback):
    """The training state at the end of every epoch, in one worker's ``folder``.

    The state is the model's and optimizer's weights, early stopping's record and the history.
    Keras' ``BackupAndRestore`` overwrites one weights file and then its epoch counter in place:
    a kill between or during the two leaves them disagreeing, or the weights unreadable. Here
    each epoch's files are new ones, and :data:`STATE_FILE`, which names them, replaces the
    last one in a single rename, so a kill at any moment leaves a whole state. The state before
    it stays too (``previous``): a worker killed while saving epoch N resumes one epoch behind
    the others, and :func:`resume_point` makes them all resume from N-1.
    """

    def __init__(self, folder: str | Path, early_stopping: _EarlyStopping,
                 resumed: dict | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.early_stopping = early_stopping
        self.last = resumed
        self.history = {k: list(v) for k, v in (resumed or {}).get("history", {}).items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.folder.mkdir(parents=True, exist_ok=True)
        # A new name each time: a restarted run must not overwrite a file the state names.
        token = f"{epoch + 1}-{uuid.uuid4().hex[:8]}"
        weights = f"epoch-{token}.weights.h5"
        self.model.save_weights(self.folder / weights)
        _fsync(self.folder / weights)
        es = self.early_stopping
        best_file = (self.last or {}).get("early_stopping", {}).get("best_weights")
        if es.best_weights is not None and es.best_epoch == epoch:
            best_file = f"best-{token}.npz"
            with open(self.folder / best_file, "wb") as f:
                np.savez(f, *es.best_weights)
                f.flush()
                os.fsync(f.fileno())
        record = {
            "epoch": epoch + 1,
            "weights": weights,
            "early_stopping": {"best": None if es.best is None else float(es.best),
                               "best_epoch": int(es.best_epoch), "wait": int(es.wait),
                               "stopped": bool(self.model.stop_training),
                               "best_weights": best_file},
            "history": {k: list(v) for k, v in self.history.items()},
        }
        _write_json(self.folder / STATE_FILE,
                    {"format": _STATE_FORMAT, **record, "previous": self.last})
        keep = _files_of(record) | _files_of(self.last)
        for path in self.folder.iterdir():
            if path.name.startswith(("epoch-", "best-")) and path.name not in keep:
                path.unlink(missing_ok=True)
        self.last = record


def _files_of(record: dict | None) -> set[str]:
    if record is None:
        return set()
    return {record["weights"]} | ({record["early_stopping"]["best_weights"]} - {None})


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state(folder: str | Path) -> dict | None:
    """The training state saved in ``folder`` by :class:`EpochBackup`, or ``None``.

    An unreadable state (not one this code wrote) is reported and ignored: training starts over
    rather than failing on every restart.
    """
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _log.warning("the training state %s is unreadable (%s): training starts over", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        _log.warning("the training state %s is of an unknown format: training starts over", path)
        return None
    return state


def resume_point(folder: str | Path, strategy: tf.distribute.Strategy | None = None
                 ) -> dict | None:
    """The saved epoch record to resume from (``None``: start from the first epoch).

    On one machine, the last one saved in ``folder``. Under ``MultiWorkerMirroredStrategy`` each
    worker reads its own folder and the workers exchange what they hold (a collective: every
    worker must call this): all resume from the last epoch that every one of them saved, or all
    start over. The workers' weights are equal at equal epochs, so each loading its own copy
    keeps them in sync; resuming from different epochs would pair one worker's steps with
    another's steps of a different epoch, on different weights.
    """
    state = read_state(folder)
    records: dict[int, dict | None] = {0: None}
    if state is not None:
        previous = state.get("previous")
        if previous:
            records[int(previous["epoch"])] = previous
        records[int(state["epoch"])] = {k: v for k, v in state.items()
                                        if k not in ("format", "previous")}
    mine = ([e for e in sorted(records, reverse=True) if e] + [0, 0])[:2]
    epoch = common_epoch(_epochs_of_every_worker(strategy or tf.distribute.get_strategy(), mine))
    if epoch != max(records):
        _log.info("this worker saved epoch %d, another one not: all resume from epoch %d",
                  max(records), epoch)
    return records[epoch]


def common_epoch(held: list[list[int]]) -> int:
    """The last epoch whose state every worker holds, from each worker's list of the epochs it
    holds (0, the start, is everyone's)."""
    return max(set.intersection(*({0, *map(int, epochs)} for epochs in held)))


def _epochs_of_every_worker(strategy: tf.distribute.Strategy, mine: list[int]) -> list[list[int]]:
    """``mine`` from every worker of a multi-worker strategy (a collective), else ``[mine]``."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return [mine]
    rows = strategy.gather(strategy.run(lambda: tf.constant([mine], tf.int64)), axis=0)
    return rows.numpy().tolist()


def _restore(model: Autoencoder, folder: Path, record: dict,
             early_stopping: _EarlyStopping) -> None:
    """Load a saved epoch's weights into ``model`` and its record into ``early_stopping``."""
    es = record["early_stopping"]
    try:
        # The optimizer's variables (built by train() before this) are in the weights file.
        model.load_weights(folder / record["weights"])
        best = None
        if es["best_weights"]:
            with np.load(folder / es["best_weights"], allow_pickle=False) as saved:
                best = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    except (OSError, ValueError) as exc:
        raise expected(f"the training state of epoch {record['epoch']} to load",
                       f"{type(exc).__name__}: {str(exc)[:200]} in {folder}",
                       hint=f"Delete {folder} to train from the first epoch") from None
    early_stopping.resumed = (es, best)


#: What a collective op of MultiWorkerMirroredStrategy raises when another worker is gone: its
#: connection reset (a crash), or no heartbeat for about 10 s (a hung or unreachable machine).
_LOST_WORKER = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError, tf.errors.CancelledError)


def lost_worker_error(exc: Exception) -> AnomalyError:
    """The one-line error of a worker whose cluster lost another worker mid-training.

    TensorFlow cannot go on with fewer workers: every worker must be started again, as
    Kubernetes restarts a Job's failed pods; they resume from the last epoch all of them saved.
    """
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if "aborted by:" in ln), None)
    if at is None:
        reason = lines[-1] if lines else ""
    else:
        reason = lines[at].split("aborted by:", 1)[1].strip()
        if reason.endswith(":") and at + 1 < len(lines):  # the task named on the next line
            reason += " " + lines[at + 1]
    reason = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", reason)[:200]
    return expected("every worker of the TF_CONFIG cluster to stay up until training ends",
                    f"{type(exc).__name__}: {reason}",
                    hint="Start every worker again: training resumes from the last epoch all "
                         "of them saved")


#: Batches the training pipeline reads ahead (:func:`image_dataset`).
PREFETCH = 2


def image_dataset(x, batch_size: int, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches ``(batch, H, W, C)`` float32 of images ``(n, H, W[, C])``: an array in memory, or
    :class:`~anomaly.data.stream.DiskImages` read from disk batch by batch (decoded and resized
    in the pipeline, the next batches prefetched while one trains).

    ``shuffle_seed``: shuffled, in a new order each epoch, from this seed. A stream shuffles the
    images' positions with the same op, seed and buffer as the array's images, so each batch
    holds the same images in the same order as from the array.
    """
    # Arrays in memory have no files to shard by: each worker of a cluster builds the whole
    # pipeline and keeps its share of every batch (DATA; AUTO would try FILE first, and warn).
    # That needs the same order on every worker, which the seeded shuffle gives. A stream's
    # files are not tf.data's own reader's either, so it is sharded the same way.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # tf.data's autotuner made the fit wait, idle, about 0.9 s at the start of 3 to 6 epochs of
    # 12 (the MNIST conv-vae, 1.6 s epochs: no CPU used meanwhile, with and without oneDNN, a
    # shuffle or a prefetch); without it none did (bench/epoch_timing.py). A fixed prefetch of
    # PREFETCH batches keeps the next batches read while one trains.
    options.autotune.enabled = False
    streamed = isinstance(x, DiskImages)
    if streamed:
        ds = tf.data.Dataset.from_tensor_slices(np.arange(len(x), dtype=np.int64))
    else:
        # No map stage for an array: Keras' array adapter adds one whose op attributes make
        # TF 2.21 log a spurious error line.
        ds = tf.data.Dataset.from_tensor_slices(np.asarray(with_channels(x), np.float32))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if streamed:
        shape = (None, *x.image_shape)

        def read(positions):
            return with_channels(x.read(positions.numpy()))

        # One reader: op determinism (set_seed) turns a parallel map of a Python function into
        # a sequential one anyway, and the rewrite logs a spurious error line in TF 2.21. The
        # prefetch still reads the next batches while one trains.
        ds = ds.map(lambda p: tf.ensure_shape(tf.py_function(read, [p], tf.float32), shape))
    if streamed or shuffle_seed is not None:
        ds = ds.prefetch(PREFETCH)
    return ds.with_options(options)


def train(model: Autoencoder, x_train: np.ndarray, x_val: np.ndarray, *, epochs: int,
          batch_size: int, learning_rate: float, patience: int,
          backup_dir: str | Path | None = None, verbose: int = 1,
          callbacks: list[keras.callbacks.Callback] | tuple = ()) -> dict[str, list[float]]:
    """Fit ``model`` on normal images with early stopping on the validation loss.

    Runs under the strategy whose scope it is called in; ``batch_size`` is the global batch,
    split over the replicas (of all workers), so one step is that of a one-device run.

    Args:
        model: an un-trained :class:`Autoencoder`.
        x_train: normal training images ``(n_train, H, W[, C])`` float32 in [0, 1], or
            :class:`~anomaly.data.stream.DiskImages` streamed from disk (:func:`image_dataset`).
        x_val: normal validation images ``(n_val, H, W[, C])``, likewise.
        backup_dir: folder for per-epoch state (:class:`EpochBackup`; a worker of a cluster
            uses its :func:`worker_backup_dir`); an existing state there is resumed, and
            removed once training ends.
        verbose: 0 silent, 1 progress (a bar on a terminal, a line per epoch otherwise; with
            :func:`anomaly.progress.set_verbosity` (2) a full line per epoch in both).

    Returns:
        The Keras history: per-epoch lists for ``loss``, ``val_loss``, ``reconstruction_loss``,
        ``kl_loss``, their ``val_`` twins, and ``epoch`` (1-based), the resumed epochs
        included. The model holds the best (lowest ``val_loss``) weights on return.
    """
    from anomaly.progress import VERBOSE, is_tty, status, verbosity

    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    # Its variables made now, not by the first step: a step that creates variables is traced
    # twice by tf.function, once to create them and once without (1.4 s of the MNIST
    # conv-vae's first epoch, 4.5 s against 3.2; the weights come out bit-identical).
    model.optimizer.build(model.trainable_variables)
    early_stopping = _EarlyStopping(patience)
    cbs: list = [early_stopping]
    folder = resumed = None
    initial_epoch = 0
    if backup_dir is not None:
        folder = worker_backup_dir(backup_dir)
        resumed = resume_point(folder)
        if resumed is not None:
            _restore(model, folder, resumed, early_stopping)
            initial_epoch = int(resumed["epoch"])
            if verbose:
                status(f"Resuming from the state in {folder}: {initial_epoch} of {epochs} "
                       "epochs done")
        # After early stopping: the state saved holds its record of the same epoch.
        cbs.append(EpochBackup(folder, early_stopping, resumed))
    keras_verbose = 0
    if verbose:
        # Keras' own bar on a terminal; plain lines in logs, and with -v in both.
        if is_tty():
            keras_verbose = 1
        if not is_tty() or verbosity() >= VERBOSE:
            cbs.append(_EpochLog(epochs, full=verbosity() >= VERBOSE))
    cbs.extend(callbacks)
    seed = int(model.seed or 0)
    train_ds = image_dataset(x_train, batch_size, shuffle_seed=seed)
    val_ds = image_dataset(x_val, batch_size)
    stopped = resumed is not None and resumed["early_stopping"]["stopped"]
    try:
        hist = model.fit(train_ds, epochs=epochs, validation_data=val_ds, callbacks=cbs,
                         verbose=keras_verbose, shuffle=False,
                         initial_epoch=epochs if stopped else initial_epoch)
    except tf.errors.OpError as exc:
        # A file that went bad after the scan: its own error, not TensorFlow's wrapping of it.
        failed = next((x.error for x in (x_train, x_val)
                       if isinstance(x, DiskImages) and x.error is not None), None)
        if failed is not None:
            raise failed from None
        if not isinstance(exc, _LOST_WORKER) or not isinstance(
                tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            raise
        raise lost_worker_error(exc) from None
    history = {k: list(v) for k, v in (resumed or {}).get("history", {}).items()}
    for key, values in hist.history.items():
        history.setdefault(key, []).extend(float(v) for v in values)
    history["epoch"] = [float(e) for e in range(1, initial_epoch + len(hist.epoch) + 1)]
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        if folder != Path(backup_dir):
            with contextlib.suppress(OSError):  # another worker's state is still there
                Path(backup_dir).rmdir()
    return history
