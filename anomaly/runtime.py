"""One way to load an artifact for scoring, whichever runtime is installed: :func:`load_runtime`.

Two backends answer the same calls (``detect``, ``decision_function``, ``predict``, and the
attributes the service reads: ``model``, ``score``, ``aggregation``, ``image_shape_``,
``calibration_``, ``threshold_``, ``metadata_``, ``metrics_``, ``path_``,
``artifact_sha256_``, plus ``runtime_`` and ``platform``):

- ``keras``: :class:`anomaly.detector.Detector` itself, on TensorFlow (the full install).
- ``onnx``: :class:`OnnxDetector`, on onnxruntime, for artifacts that ``anomaly export
  --format onnx`` wrote (``model.onnx`` + ``onnx.json``). It never imports TensorFlow, Keras
  or the detector module, so the ``serve`` extra (no TensorFlow) is enough to run it.

Which one (``ANOMALY_RUNTIME``, default ``auto``): ``auto`` uses onnxruntime when the artifact
holds an export and onnxruntime is installed (1.8x the TensorFlow path's images/s on this
project's 2-core machine, a tenth of its single-image latency: bench/results/runtime-bench.md),
and Keras otherwise; ``onnx`` and ``keras`` force one. An artifact without
``model.onnx`` cannot be served without TensorFlow, and says so, naming ``anomaly export``.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from anomaly.errors import ArtifactError, ConfigError, expected
from anomaly.extras import install_hint

RUNTIMES = ("auto", "keras", "onnx")
ENV = "ANOMALY_RUNTIME"
ONNX_FILE, SIDECAR = "model.onnx", "onnx.json"
#: Sidecar layout this module reads (``anomaly.export.onnx.EXPORT_FORMAT``).
SIDECAR_FORMAT = 1
#: Images per onnxruntime call. Small enough that one call's activations stay in a core's cache
#: (the MNIST conv-vae on this project's 2-core machine, two threads of one-thread calls,
#: images/s: 16 -> 16,100, 32 -> 16,000, 64 -> 14,600, 128 -> 14,000;
#: bench/results/runtime-bench.md), and it bounds the memory of a huge request.
CHUNK = 32
_OUTPUTS = ("score", "normalized", "is_anomaly", "parts")


def onnxruntime_installed() -> bool:
    """Whether onnxruntime can be imported (checked without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def choose_runtime(has_onnx: bool, requested: str | None = None, *,
                   tensorflow: bool | None = None, where: str = "the artifact",
                   prefer: str = "onnx") -> str:
    """``"keras"`` or ``"onnx"`` for an artifact (see the module docstring).

    Args:
        has_onnx: the artifact holds ``model.onnx``.
        requested: ``auto``, ``keras`` or ``onnx``; default ``$ANOMALY_RUNTIME`` or ``auto``.
        tensorflow: whether TensorFlow is installed; default :func:`tensorflow_installed`.
        prefer: what ``auto`` picks when both can run: ``onnx`` (the faster on a CPU, and
            it loads no TensorFlow) or ``keras``.
    """
    requested = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if requested not in RUNTIMES:
        raise expected(f"{ENV} in {RUNTIMES}", repr(requested)[:40], cls=ConfigError)
    tf_ok = tensorflow_installed() if tensorflow is None else tensorflow
    if requested == "auto" and prefer == "onnx" and has_onnx and onnxruntime_installed():
        return "onnx"
    export_hint = ("Run 'anomaly export ARTIFACT --format onnx' where TensorFlow is installed "
                   "and serve the version it writes.")
    if requested == "onnx" or (requested == "auto" and not tf_ok):
        if not has_onnx:
            why = f"{ENV}=onnx" if requested == "onnx" else "TensorFlow is not installed"
            raise expected(f"an artifact exported to ONNX (model.onnx) because {why}",
                           f"no model.onnx in {where}", hint=export_hint, cls=ArtifactError)
        return "onnx"
    if not tf_ok:
        raise expected(f"TensorFlow installed for {ENV}=keras", "not installed",
                       hint=f"{install_hint('full')}, or score ONNX exports with {ENV}=onnx.",
                       cls=ConfigError)
    return "keras"


class OnnxDetector:
    """An exported artifact scored by onnxruntime: the graph does everything (scores, kNN,
    standardization, normalized scores, decisions at every operating point).

    Build it with :func:`load_runtime`; ``artifact`` is a verified
    :class:`anomaly.artifact.Artifact`.
    """

    runtime_ = "onnx"
    platform = "onnxruntime_onnx"

    def __init__(self, artifact, *, threads: int | None = None):
        import onnxruntime as ort

        from anomaly.calibration import Calibration

        self.path_, self.artifact_sha256_ = artifact.path, artifact.sha256
        self.metadata_ = artifact.metadata
        self.metrics_ = artifact.metrics
        try:
            self.sidecar_ = side = artifact.json(SIDECAR)
            spec = artifact.json("detector.json")
            hyper = spec["hyperparameters"]
            self.model, self.score = str(hyper["model"]), str(hyper["score"])
            self.aggregation = str(hyper["aggregation"])
            self.image_shape_ = tuple(int(v) for v in spec["image_shape"])
            self.calibration_ = Calibration.from_dict(artifact.json("calibration.json"))
            if side.get("format") != SIDECAR_FORMAT:
                raise expected(f"{SIDECAR} format {SIDECAR_FORMAT}",
                               f"{side.get('format')!r} in {artifact.path}",
                               hint="Export it again with this version of anomaly.",
                               cls=ArtifactError)
            self.operating_points_ = [str(n) for n in side["operating_points"]]
            self.input_ = side["input"]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise expected(f"a readable {SIDECAR}, detector.json and calibration.json",
                           f"{type(exc).__name__}: {str(exc)[:200]} in {artifact.path}",
                           cls=ArtifactError) from None
        # The thresholds are constants of the graph: they must be the artifact's.
        if side.get("calibration_sha256") != self.calibration_.fingerprint() or sorted(
                self.operating_points_) != sorted(self.calibration_.operating_points):
            raise expected("an ONNX graph exported with this artifact's calibration",
                           f"a graph whose thresholds differ from calibration.json in "
                           f"{artifact.path}", hint="Export the artifact again.",
                           cls=ArtifactError)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Each call runs on one core, in the calling thread; a batch is split over `threads`
        # threads of ours, calling the one session at once (onnxruntime lets go of the GIL).
        # onnxruntime's own pool splits each kernel of a call instead, and waits for its threads
        # at every node of the graph: 1.5x slower on two cores.
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.threads_ = max(1, int(threads or _cores()))
        self._pool = None
        self._pool_lock = threading.Lock()
        try:
            self.session_ = ort.InferenceSession(artifact.file(ONNX_FILE).read_bytes(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types, not ValueError
            raise expected("an ONNX graph onnxruntime can load",
                           f"{type(exc).__name__}: {str(exc)[:200]}", cls=ArtifactError) from None
        names = {o.name for o in self.session_.get_outputs()}
        inputs = [i.name for i in self.session_.get_inputs()]
        missing = sorted({*_OUTPUTS, "reconstruction", "error_map"} - names)
        if missing or inputs != [self.input_["name"]]:
            raise expected(f"an ONNX graph with input {self.input_['name']!r} and outputs "
                           f"{sorted(names | set(missing))}",
                           f"inputs {inputs}, missing outputs {missing}", cls=ArtifactError)
        self.threshold_ = self.calibration_.get().threshold

    def __repr__(self) -> str:
        return f"OnnxDetector({self.path_})"

    def _images(self, images) -> np.ndarray:
        from anomaly.data.images import to_unit_float

        return to_unit_float(images, shape=self.image_shape_)

    def _graph_input(self, x: np.ndarray) -> np.ndarray:
        h, w, c = self.image_shape_
        want = (h, w) if c == 1 else (h, w, c)
        x = np.ascontiguousarray(x, np.float32)
        if c == 1 and x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.shape[1:] != want:
            raise expected(f"images of shape (N, {', '.join(map(str, want))})",
                           f"shape {x.shape}", cls=ConfigError)
        return x

    def run(self, x: np.ndarray, *, full: bool = False) -> dict[str, np.ndarray]:
        """The graph's outputs for validated images ``(N, H, W[, C])`` float32 in [0, 1],
        ``CHUNK`` images per call; ``full`` adds ``reconstruction`` and ``error_map``."""
        x = self._graph_input(x)
        names = [*_OUTPUTS, *(("reconstruction", "error_map") if full else ())]
        if len(x) == 0:
            raise expected("at least one image", "0 images", cls=ConfigError)
        feed = self.input_["name"]
        starts = range(0, len(x), CHUNK)
        if len(starts) == 1 or self.threads_ == 1:
            chunks = [self.session_.run(names, {feed: x[i : i + CHUNK]}) for i in starts]
        else:
            chunks = list(self._executor().map(
                lambda i: self.session_.run(names, {feed: x[i : i + CHUNK]}), starts))
        if len(chunks) == 1:
            return dict(zip(names, chunks[0], strict=True))
        return {n: np.concatenate([c[k] for c in chunks]) for k, n in enumerate(names)}

    def _executor(self):
        from concurrent.futures import ThreadPoolExecutor

        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads_, thread_name_prefix="onnx-detect")
            return self._pool

    def detect(self, images, *, operating_point: str | None = None,
               reconstruction: bool = False, error_map: bool = False,
               validated: bool = False):
        """Like :meth:`Detector.detect <anomaly.detector.Detector.detect>`: images
        ``(N, H, W[, C])`` -> :class:`anomaly.detector.DetectorOutput`, every value from the
        graph."""
        # The detector's own result type (that module imports no TensorFlow at its top).
        from anomaly.detector import DetectorOutput

        op = self.calibration_.get(operating_point)
        x = images if validated else self._images(images)
        out = self.run(x, full=reconstruction or error_map)
        column = self.operating_points_.index(op.name)
        return DetectorOutput(out["score"].astype(np.float64), out["normalized"],
                             out["is_anomaly"][:, column].astype(bool), op.name, op.threshold,
                             out["reconstruction"] if reconstruction else None,
                             out["error_map"] if error_map else None,
                             out["parts"].astype(np.float64))

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores ``(N,)`` float64 of images ``(N, H, W[, C])``."""
        return self.run(self._images(X))["score"].astype(np.float64)

    def predict(self, X, operating_point: str | None = None) -> np.ndarray:
        """``(N,)`` int: 1 = anomalous at the operating point (default: the default one)."""
        return self.detect(X, operating_point=operating_point).is_anomaly.astype(np.int64)


def _cores() -> int:
    """CPUs this process may run on (a container's or ``taskset``'s share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_runtime(artifact_path: str | Path, *, runtime: str | None = None, verify: bool = True,
                 prefer: str = "onnx", threads: int | None = None):
    """Load the artifact at ``artifact_path`` with the runtime :func:`choose_runtime` picks.

    Args:
        artifact_path: anything :func:`anomaly.artifact.resolve` takes.
        runtime: ``auto``, ``keras`` or ``onnx``; default ``$ANOMALY_RUNTIME`` or ``auto``.
        verify: check the manifest (every file's SHA-256) first.
        prefer: what ``auto`` picks when both runtimes can run (see :func:`choose_runtime`).
        threads: CPU threads for the runtime (``None``: every core this process may use); for
            onnxruntime, how many ``CHUNK``-image calls of a batch run at once, one a thread.

    Returns:
        A :class:`anomaly.detector.Detector` (``runtime_ == "keras"``) or an
        :class:`OnnxDetector`; both score images ``(N, H, W[, C])`` with ``detect``.
    """
    from anomaly.artifact import read_artifact

    art = read_artifact(artifact_path, verify_files=verify)
    chosen = choose_runtime(art.has(ONNX_FILE) and art.has(SIDECAR), runtime,
                            where=str(art.path), prefer=prefer)
    if chosen == "onnx":
        return OnnxDetector(art, threads=threads)
    from anomaly._tf import tf  # TensorFlow without its start-up noise

    if threads:
        try:  # only before TensorFlow's first op; a process that already ran one keeps its own
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:
            pass
    from anomaly.detector import Detector

    det = Detector.load(art.path, verify=False)  # verified just above
    det.runtime_, det.platform = "keras", "tensorflow_keras"
    return det

