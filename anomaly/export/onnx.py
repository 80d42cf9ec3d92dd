"""``anomaly export ARTIFACT --format onnx``: one ONNX graph that scores, decides and explains.

The graph takes a batch of images and returns everything :meth:`Detector.detect
<anomaly.detector.Detector.detect>` does, with nothing left outside it:

========================  ==========  ==================================================
name                      dtype       shape / meaning
========================  ==========  ==================================================
``images`` (input)        float32     ``[N, H, W]`` (grey) or ``[N, H, W, C]``, in [0, 1]
``score``                 float64     ``[N]`` anomaly score, higher = more anomalous
``normalized``            float64     ``[N]`` fraction of normal reference scores <= score
``is_anomaly``            bool        ``[N, P]`` ``score > threshold`` at each operating
                                      point, in the order of ``operating_points``
``parts``                 float32     ``[N, K]`` the raw score parts (:data:`PARTS`)
``reconstruction``        float32     like ``images``
``error_map``             float32     like ``images``, per-pixel error
========================  ==========  ==================================================

The network, the latent kNN memory (``mse+knn``), the standardizer and the thresholds are
constants of the graph. It is the same :meth:`Scorer._graph <anomaly.scoring.Scorer._graph>`
the TensorFlow path runs, traced once more with the memory as graph constants (tf2onnx turns
captured eager tensors into extra inputs otherwise), then the float64 combination, the
normalized score and the decisions, which :class:`~anomaly.scoring.Standardizer` and
:class:`~anomaly.calibration.Calibration` compute in NumPy on the TensorFlow path.

TensorFlow pads every batch to a multiple of ``ROW_BLOCK`` so a score does not depend on its
batch; onnxruntime's CPU kernels need it far less, so the graph takes any batch size as it is.
Measured (bench/batch_independence.py), an image alone against the same image in a batch of
512 (the MNIST conv-vae of ``anomaly fit --normal-class 0``, 128 test images): the score parts differ by 1.1e-7 relative
at most, the combined score by 6.2e-7 absolute (2.2e-6 relative, where the z-score sum is
near 0), against 5e-5 relative between batch sizes in TensorFlow unpadded. A barely trained
model amplifies it: the service tests' model (standardizer std ~3e-3) showed 3.3e-5.

tf2onnx's graph is then rewritten where onnxruntime's CPU kernels run a same-valued one faster
(:mod:`anomaly.export.rewrite`: the conv decoder's transposed convolutions, 2.2x on the MNIST
conv-vae), before the verification below.

tf2onnx 1.17 (with TensorFlow 2.21 / Keras 3) converts every op of the five models but one:
``Log1p`` (in the Bernoulli KL of ``bce`` and ``elbo``) has no handler; :func:`_log1p` supplies
one, exact to float32 rounding. Monte Carlo ELBO (``mc_samples > 0``) draws random samples and is
refused: its scores could not equal the TensorFlow ones.

The calibration travels three ways: baked into the graph (thresholds, reference scores), in the
ONNX ``metadata_props`` (``anomaly.*`` keys, JSON values) and in the sidecar ``onnx.json``.
Every export is checked before it is written: onnxruntime and the TensorFlow detector score the
same probe images, and the export is refused unless the scores agree to :data:`TOLERANCE`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.errors import ArtifactError, ConfigError, expected

ONNX_FILE = "model.onnx"
SIDECAR = "onnx.json"
#: Version of the sidecar's and metadata's layout.
EXPORT_FORMAT = 1
#: ONNX opset: 17 is what onnxruntime >= 1.12 and Triton's onnxruntime backend all run.
OPSET = 17
INPUT = "images"
OUTPUTS = ("score", "normalized", "is_anomaly", "parts", "reconstruction", "error_map")
#: Largest relative difference allowed between onnxruntime's and TensorFlow's scores.
TOLERANCE = 1e-5
#: Files of the source artifact that are not copied into the exported version.
_REGENERATED = ("manifest.json", "metadata.json", ONNX_FILE, SIDECAR)


@dataclass
class Exported:
    """Result of :func:`export_onnx`.

    Attributes:
        path: the new artifact directory; ``sidecar``: the content of its ``onnx.json``;
        max_relative_error: onnxruntime vs TensorFlow on the probe images.
    """

    path: Path
    sidecar: dict
    max_relative_error: float


def _log1p(ctx, node, name, args):
    """tf2onnx handler for ``Log1p``, which tf2onnx 1.17 lacks.

    ``log(1 + x)`` alone loses the low bits of small ``x``; Kahan's correction
    ``log(u) * x / (u - 1)`` with ``u = 1 + x`` recovers them (and ``x`` itself where ``u``
    rounds to 1).
    """
    from tf2onnx import utils

    x = node.input[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype)).output[0]
    zero = ctx.make_const(utils.make_name(f"{name}_zero"), np.array(0, dtype)).output[0]
    u = ctx.make_node("Add", [x, one], op_name_scope=name).output[0]
    d = ctx.make_node("Sub", [u, one], op_name_scope=name).output[0]
    log_u = ctx.make_node("Log", [u], op_name_scope=name).output[0]
    ratio = ctx.make_node("Div", [x, d], op_name_scope=name).output[0]
    corrected = ctx.make_node("Mul", [log_u, ratio], op_name_scope=name).output[0]
    rounds_to_one = ctx.make_node("Equal", [d, zero], op_name_scope=name).output[0]
    node.type = "Where"
    ctx.replace_inputs(node, [rounds_to_one, x, corrected])
    return node


def check_exportable(detector) -> None:
    """Raise :class:`ConfigError` for a fitted detector whose score cannot be one graph."""
    if detector.mc_samples:
        raise expected("a deterministic score to export (mc_samples 0)",
                       f"mc_samples={detector.mc_samples}",
                       hint="Monte Carlo ELBO samples at random, so its ONNX scores could not "
                       "equal the TensorFlow ones; export a detector with mc_samples 0.",
                       cls=ConfigError)


def input_shape(image_shape) -> list[int]:
    """The graph input's shape for a model's ``(H, W, C)``: ``[-1, H, W]`` or ``[-1, H, W, C]``."""
    h, w, c = (int(v) for v in image_shape)
    return [-1, h, w] if c == 1 else [-1, h, w, c]


def build_function(detector):
    """The scoring graph as a ``tf.function`` of one ``images`` batch (see module docstring).

    Returns:
        ``(function, input_signature, operating_point_names)``.
    """
    from anomaly._tf import tf

    check_exportable(detector)
    scorer = copy.copy(detector.scorer)  # its constants are replaced while tracing, below
    h, w, c = (int(v) for v in detector.image_shape_)
    cal = detector.calibration_
    names = list(cal.operating_points)
    thresholds = np.array([cal.operating_points[n].threshold for n in names], np.float64)
    reference = np.asarray(cal.reference_scores, np.float64)
    memory = None if scorer.knn is None else np.asarray(scorer.knn.memory, np.float32)
    std = detector.standardizer_
    spec = (tf.TensorSpec([None, *input_shape(detector.image_shape_)[1:]], tf.float32,
                          name=INPUT),)

    def serve(images):
        if memory is not None:
            # Created inside the trace, they become ONNX initializers instead of graph inputs.
            scorer._memory = tf.constant(memory)
            scorer._memory_sq = tf.constant(
                (memory.astype(np.float64) ** 2).sum(1).astype(np.float32))
        parts, recon, err = scorer._graph(tf.reshape(images, [-1, h, w, c]))
        p64 = tf.cast(parts, tf.float64)
        if parts.shape[1] == 1:
            score = p64[:, 0]
        else:
            score = tf.reduce_sum((p64 - tf.constant(std.mean, tf.float64))
                                  / tf.constant(std.std, tf.float64), axis=1)
        below = tf.cast(tf.constant(reference)[None, :] <= score[:, None], tf.float64)
        out_shape = tf.shape(images)
        return {
            "score": tf.identity(score, name="score"),
            # Grappler turns this division into a product with 1/n: NumPy's quotient to 1 ulp.
            "normalized": tf.reduce_sum(below, axis=1) / float(reference.size),
            "is_anomaly": score[:, None] > tf.constant(thresholds)[None, :],
            "parts": parts,
            "reconstruction": tf.reshape(recon, out_shape),
            "error_map": tf.reshape(err, out_shape),
        }

    # No autograph, as the scorer's own graph (anomaly.scoring): nothing in it needs converting.
    return tf.function(serve, input_signature=spec, autograph=False), spec, names


def metadata_props(sidecar: dict) -> dict[str, str]:
    """The ``anomaly.*`` ONNX metadata: each top-level sidecar entry as a JSON string."""
    return {f"anomaly.{k}": json.dumps(v, sort_keys=True) for k, v in sidecar.items()}


def _describe(detector, names: list[str]) -> dict:
    from importlib import metadata as md

    from anomaly.scoring import PARTS

    shape = input_shape(detector.image_shape_)
    n_ops = len(names)
    outputs = [
        {"name": "score", "dtype": "float64", "shape": [-1]},
        {"name": "normalized", "dtype": "float64", "shape": [-1]},
        {"name": "is_anomaly", "dtype": "bool", "shape": [-1, n_ops]},
        {"name": "parts", "dtype": "float32", "shape": [-1, len(PARTS[detector.score])]},
        {"name": "reconstruction", "dtype": "float32", "shape": shape},
        {"name": "error_map", "dtype": "float32", "shape": shape},
    ]
    cal = detector.calibration_
    return {
        "format": EXPORT_FORMAT,
        "input": {"name": INPUT, "dtype": "float32", "shape": shape, "range": [0.0, 1.0]},
        "outputs": outputs,
        "operating_points": names,
        "default_operating_point": cal.default,
        "thresholds": {n: float(cal.operating_points[n].threshold) for n in names},
        "image_shape": [int(v) for v in detector.image_shape_],
        "model_type": detector.model,
        "score": detector.score,
        "aggregation": detector.aggregation,
        "parts": list(PARTS[detector.score]),
        "calibration_sha256": cal.fingerprint(),
        "converter": {"tf2onnx": md.version("tf2onnx"), "onnx": md.version("onnx"),
                      "tensorflow": md.version("tensorflow"), "opset": OPSET},
    }


def to_onnx(detector):
    """Convert a fitted detector to an ``onnx.ModelProto`` (no metadata yet).

    Returns:
        ``(model_proto, description)``: the description is the sidecar without its
        verification and calibration entries.
    """
    import tf2onnx

    function, spec, names = build_function(detector)
    try:
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=spec, opset=OPSET,
            custom_op_handlers={"Log1p": (_log1p, [])})
    except Exception as exc:  # tf2onnx raises bare exceptions naming the op it cannot convert
        raise expected("a model tf2onnx can convert",
                       f"{type(exc).__name__}: {str(exc)[:300]}", cls=ArtifactError) from exc
    from anomaly.export.rewrite import rewrite

    return rewrite(proto), _describe(detector, names)


def probe_images(image_shape, n: int = 24, seed: int = 0) -> np.ndarray:
    """Images ``(n, H, W[, C])`` float32 in [0, 1] that cover the input range: black, white,
    uniform noise and smooth random blobs (normal-looking for most training sets)."""
    h, w, c = (int(v) for v in image_shape)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = []
    for _ in range(n - 2 - n // 4):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        s = rng.uniform(0.1, 0.2) * min(h, w)
        blobs.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
    x = np.concatenate([np.zeros((1, h, w)), np.ones((1, h, w)),
                        rng.uniform(0, 1, (n // 4, h, w)), np.stack(blobs)]).astype(np.float32)
    x = np.repeat(x[..., None], c, axis=-1)
    return x[..., 0] if c == 1 else x


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest ``|got - want| / |want|`` (``inf`` where they disagree in finiteness)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.array_equal(np.isfinite(got), np.isfinite(want)):
        return math.inf
    ok = np.isfinite(want)
    if not ok.any():
        return 0.0
    diff = np.abs(got[ok] - want[ok])
    denom = np.abs(want[ok])
    # An exact zero can only be matched exactly (relative error is undefined there).
    rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1.0), np.where(diff > 0,
                                                                               math.inf, 0.0))
    return float(rel.max())


def _log_parts(detector) -> bool:
    from anomaly.scoring import PARTS

    return all(name.startswith("log_") for name in PARTS[detector.score])


def part_error(detector, got: np.ndarray, want: np.ndarray) -> float:
    """Largest relative difference of the quantities behind the raw parts ``(N, K)``.

    ``mse+knn``'s parts are logs, whose absolute difference is the relative difference of the
    error and the kNN distance (a log near 0 would make a relative difference of the log
    meaningless); other parts are compared relatively. The kNN distance is compared relative
    to its conditioning: a squared distance ``d`` between codes of norm about ``r`` that each
    runtime rounds by a relative ``e`` differs by about ``2 e r sqrt(d)``, that is ``2 e
    r / sqrt(d)`` of itself, so its log may differ by ``TOLERANCE * r / sqrt(d)`` where
    ``sqrt(d) < r`` (``r``: the memory codes' root-mean-square norm). Without it,
    ``tests/export``'s tiny ``mse+knn+tp`` detector failed the plain 1e-5 at 1.74e-5.
    """
    if not _log_parts(detector):
        return relative_error(got, want)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    if not np.isfinite(diff).all():
        return math.inf
    from anomaly.scoring import PARTS

    names = PARTS[detector.score]
    if "log_knn" in names and getattr(detector, "knn_", None) is not None:
        j = names.index("log_knn")
        memory = np.asarray(detector.knn_.memory, np.float64)
        r = float(np.sqrt(np.mean(np.sum(memory ** 2, axis=1))))
        diff[:, j] /= np.maximum(1.0, r / np.exp(want[:, j] / 2))  # r / sqrt(d)
    return float(np.max(diff, initial=0.0))


def score_tolerance(detector, parts: np.ndarray) -> np.ndarray:
    """``(N,)`` largest score differences allowed for raw parts ``(N, K)``.

    :data:`TOLERANCE` relative to the score where it is one part. A combined ``mse+knn`` score
    is allowed :data:`TOLERANCE` relative on its error and its kNN distance, carried through
    the standardization: the two runtimes round float32 reductions differently (about one ulp),
    and a standardizer fitted on barely-trained test models divides by a std of ~3e-3, which
    makes one ulp of ``log_mse`` 4e-5 of the score.
    """
    parts = np.asarray(parts, np.float64)
    if parts.shape[1] == 1:
        return TOLERANCE * np.abs(parts[:, 0])
    std = np.asarray(detector.standardizer_.std, np.float64)
    combined = detector.standardizer_.combine(parts)
    return TOLERANCE * (np.abs(combined) + (1.0 / std).sum())


def onnx_session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not ours to fix
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def verify_export(model_bytes: bytes, detector, images: np.ndarray | None = None) -> float:
    """Score ``images`` (default :func:`probe_images`) with onnxruntime and with the detector.

    Returns:
        The largest relative score difference. Raises :class:`ArtifactError` when the parts
        differ by more than :data:`TOLERANCE` relative, the scores by more than
        :func:`score_tolerance`, a decision away from its threshold, or a reconstruction pixel
        by more than 1e-4.
    """
    x = probe_images(detector.image_shape_) if images is None else images
    session = onnx_session(model_bytes)
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {INPUT: x}), strict=True))
    want = detector.detect(x, reconstruction=True, error_map=True)
    parts_err = part_error(detector, got["parts"], want.parts)
    if not parts_err <= TOLERANCE:
        raise expected(f"ONNX score parts equal to the TensorFlow ones within {TOLERANCE:g} "
                       "relative", f"{parts_err:.3g} on {len(x)} probe images",
                       cls=ArtifactError)
    err = relative_error(got["score"], want.scores)
    if not np.all(np.abs(got["score"] - want.scores) <= score_tolerance(detector, want.parts)):
        raise expected(f"ONNX scores equal to the TensorFlow ones within {TOLERANCE:g} relative "
                       "(of the score and of its parts)", f"{err:.3g} on {len(x)} probe images",
                       cls=ArtifactError)
    cal = detector.calibration_
    for j, name in enumerate(cal.operating_points):
        differ = got["is_anomaly"][:, j] != cal.decide(want.scores, name)
        near = np.abs(want.scores - cal.operating_points[name].threshold) <= (
            TOLERANCE * np.abs(want.scores))
        if (differ & ~near).any():
            raise expected(f"the ONNX decisions at {name} equal to the TensorFlow ones",
                           f"{int(differ.sum())} of {len(x)} differ", cls=ArtifactError)
    gap = float(np.max(np.abs(got["reconstruction"] - want.reconstruction), initial=0.0))
    if not gap <= 1e-4:  # pixels in [0, 1]: an absolute error (dark pixels are near 0)
        raise expected("ONNX reconstructions equal to the TensorFlow ones within 1e-4",
                       f"{gap:.3g}", cls=ArtifactError)
    return err


def export_bytes(detector) -> tuple[bytes, dict, float]:
    """Convert, describe and verify: ``(model.onnx bytes, sidecar dict, max relative error)``."""
    proto, sidecar = to_onnx(detector)
    for key, value in metadata_props(sidecar).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    entry = proto.metadata_props.add()
    entry.key = "anomaly.calibration"
    entry.value = json.dumps(detector.calibration_.to_dict(), sort_keys=True)
    proto.doc_string = (f"anomaly {detector.model} detector, score {detector.score}: inputs "
                        f"{INPUT}; outputs {', '.join(OUTPUTS)} (see onnx.json)")
    data = proto.SerializeToString()
    err = verify_export(data, detector)
    import hashlib

    sidecar["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    sidecar["verification"] = {"probe_images": len(probe_images(detector.image_shape_)),
                               "max_relative_error": err, "tolerance": TOLERANCE}
    sidecar["calibration"] = detector.calibration_.to_dict()
    return data, sidecar, err


def _next_version(model_dir: Path) -> Path:
    from anomaly.artifact import new_version_path

    return new_version_path(model_dir.parent, model_dir.name)


def onnx_files(detector) -> dict[str, bytes | str]:
    """``{"model.onnx": ..., "onnx.json": ...}`` of a fitted detector, verified against it, for
    ``Detector.save(extra_files=...)``: what ``anomaly fit`` and ``anomaly calibrate`` write
    into every new artifact so that it serves under the light install."""
    data, sidecar, _ = export_bytes(detector)
    return {ONNX_FILE: data, SIDECAR: json.dumps(sidecar, indent=2) + "\n"}


def export_onnx(artifact: str | Path, output: str | Path | None = None) -> Exported:
    """Export an artifact as a new verified version with ``model.onnx`` and ``onnx.json``.

    Args:
        artifact: anything :func:`anomaly.artifact.resolve` takes.
        output: the directory to write the exported artifact to; default a new version
            ``MODELS/NAME/<UTC timestamp>`` beside the source.

    Returns:
        :class:`Exported`. The new artifact holds every file of the source unchanged plus the
        two new ones; its ``metadata.json`` records the source version and hash.
    """
    from anomaly.artifact import read_artifact, write_artifact
    from anomaly.detector import Detector

    art = read_artifact(artifact)
    detector = Detector.load(art.path)
    data, sidecar, err = export_bytes(detector)
    name = art.metadata.get("name") or art.path.parent.name
    sidecar["source"] = {"name": name, "version": art.path.name, "artifact_sha256": art.sha256}
    dest = Path(output) if output is not None else _next_version(art.path.parent)
    files: dict = {f: (art.path / f).read_bytes() for f in art.manifest["files"]
                   if f not in _REGENERATED}
    files[ONNX_FILE] = data
    files[SIDECAR] = json.dumps(sidecar, indent=2) + "\n"
    keep = {k: v for k, v in art.metadata.items()
            if k not in ("format_version", "name", "version", "created_at")}
    meta = {**keep, "name": name, "version": dest.name,
            "exported_from": sidecar["source"], "runtimes": ["keras", "onnx"]}
    path = write_artifact(dest, files, metadata=meta)
    return Exported(path, sidecar, err)
