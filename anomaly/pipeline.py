"""The training pipeline: config -> data (split once) -> fit -> calibrate -> evaluate -> artifact.

Each step lives in its own module; this one only wires them together for ``anomaly fit`` and
``anomaly evaluate`` and reports progress on stderr.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly.artifact import check_name, new_version_path
from anomaly.config import RunConfig
from anomaly.data.prepare import load_test_set, prepare
from anomaly.data.splits import OneClassSplit, TestSet
from anomaly.data.stream import DiskImages
from anomaly.errors import ConfigError, expected
from anomaly.progress import in_chunks, status


def log(msg: str) -> None:
    status(msg)  # silent under -q


def default_name(data_name: str, normal_classes: tuple[int, ...], model: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in data_name).strip("-.")
    return f"{slug or 'data'}-{'_'.join(map(str, normal_classes))}-{model}"


def epochs_run(history: dict) -> int:
    """Epochs trained in all, counting those restored by a resumed run."""
    return int(history["epoch"][-1]) if history.get("epoch") else len(history.get("loss", []))


def _train_end_timer():
    """A Keras callback whose ``at`` is when training ended: a fit's time then splits into
    training and calibration without the detector having to time itself."""
    import keras

    class TrainEnd(keras.callbacks.Callback):
        at: float | None = None

        def on_train_end(self, logs=None):
            self.at = time.perf_counter()

    return TrainEnd()


@dataclass
class FitResult:
    """What ``anomaly fit`` made: the artifact, the detector, and the split's test scores.

    Attributes:
        test: the run's labelled test images (``None`` without test data); ``scores`` their
            anomaly scores ``(n_test,)``, computed once for the evaluation and the report.
    """

    path: Path | None
    detector: object
    evaluation: object | None
    timings: dict[str, float]
    split: OneClassSplit | None = None
    test: TestSet | None = None
    scores: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def check_resolvable(cfg: RunConfig, n_reference: int) -> None:
    """Refuse, before training, ``fpr@`` targets that ``n_reference`` normal hold-out images
    cannot resolve: calibration would refuse them only after the whole training (small data
    sets such as an MVTec AD category hold a few hundred normal images)."""
    from anomaly.calibration import MIN_EXCEEDANCES, fpr_name, required_reference

    if cfg.detector.force_calibration:
        return
    for fpr in cfg.detector.target_fprs:
        need = required_reference(fpr)
        if n_reference < need:
            raise expected(
                f"at least {need} normal reference scores to resolve {fpr_name(fpr)} "
                f"({MIN_EXCEEDANCES} expected false positives among them)",
                f"{n_reference} (the normal hold-out; checked before training)",
                hint="Use more normal images, a larger --val-fraction or target FPR "
                     "(--target-fpr), or force it (--force-calibration)", cls=ConfigError)


def run_fit(cfg: RunConfig, *, verbose: int = 1, skip_bad: bool = False) -> FitResult:
    """Train, calibrate, evaluate and save one detector as described by ``cfg``.

    ``skip_bad``: leave out undecodable files of image folders (``result.split.skipped``);
    recorded in the artifact so that ``evaluate``/``report`` rebuild the same split.
    ``timings`` holds seconds: ``data_s``, ``fit_s`` (``train_s`` of it in Keras ``fit``,
    ``calibrate_s`` after it: kNN memory and thresholds), ``evaluate_s``, ``save_s``,
    ``total_s``.
    """
    import pandas as pd  # noqa: F401  (loaded before timing starts, as the detector needs it)

    from anomaly.detector import Detector
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    detector = Detector.from_config(cfg.detector)
    detector.check_params()  # a bad --model or value fails before the data is loaded
    point = cfg.detector.default_operating_point
    if point in ("f1-max", "youden") and not cfg.calibration_anomalies:
        raise expected(f"--calibration-anomalies N for the '{point}' operating point", "none",
                       cls=ConfigError)
    split = prepare(cfg, skip_bad=skip_bad)
    check_resolvable(cfg, len(split.x_val))
    name = check_name(cfg.name or default_name(split.dataset, split.normal_classes,
                                               cfg.detector.model))
    root = Path(cfg.output)
    timings["data_s"] = time.perf_counter() - t0
    streamed = isinstance(split.x_train, DiskImages)
    log(f"Training {cfg.detector.model} on {len(split.x_train)} normal images of "
        f"{split.dataset} (classes {list(split.normal_classes)}), validating on "
        f"{len(split.x_val)}" + (", streamed from disk." if streamed else "."))
    # A killed run resumes from the state saved for the same configuration.
    run_key = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]
    backup_dir = root / name / f".resume-{run_key}"
    t = time.perf_counter()
    train_end = _train_end_timer()
    try:
        detector.fit(split.x_train, x_val=split.x_val,
                     calibration_anomalies=split.x_cal_anomalies, backup_dir=backup_dir,
                     verbose=verbose, distribute=cfg.distribute, callbacks=[train_end])
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # a half-written resume state must not be resumed
            shutil.rmtree(backup_dir, ignore_errors=True)
        raise
    timings["fit_s"] = time.perf_counter() - t
    if train_end.at is not None:  # the rest of Detector.fit calibrates
        timings["train_s"] = train_end.at - t
        timings["calibrate_s"] = timings["fit_s"] - timings["train_s"]
    ev = scores = None
    test = split.test
    if test is not None:
        t = time.perf_counter()
        scores, ev = evaluate_test_set(detector, test)
        timings["evaluate_s"] = time.perf_counter() - t
    from anomaly.training import is_chief

    if not is_chief():
        log("Not the chief worker of the TF_CONFIG cluster: the chief writes the artifact.")
        return FitResult(None, detector, ev, timings, split, test, scores)
    path = new_version_path(root, name)
    t = time.perf_counter()
    metadata = {
        "name": name,
        "version": path.name,
        "dataset": split.dataset,
        "data_source": split.source,
        "normal_classes": list(split.normal_classes),
        "class_names": list(split.class_names) if split.class_names else None,
        "n_train": len(split.x_train),
        "n_val": len(split.x_val),
        "epochs_run": epochs_run(detector.history_),
        "distribute": detector.strategy_,
        "precision": detector.precision_,
        "streamed": streamed,
    }
    if skip_bad:
        metadata["skip_bad"] = True
        metadata["skipped_files"] = [{"file": f, "reason": why} for f, why in split.skipped]
    extra = {"config.yaml": cfg.to_yaml(), **_onnx_files(detector)}
    if ev is not None:
        import json

        extra["metrics.json"] = json.dumps(ev.metrics, indent=2) + "\n"
        extra["per_class.csv"] = ev.per_class.to_csv(index=False)
    detector.save(path, metadata=metadata, extra_files=extra)
    shutil.rmtree(backup_dir, ignore_errors=True)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return FitResult(path, detector, ev, timings, split, test, scores)


def _onnx_files(detector) -> dict:
    """The ONNX export for the artifact, so it serves without TensorFlow; a model the exporter
    cannot convert (Monte Carlo scores) is saved without it, with a note."""
    from anomaly.export.onnx import onnx_files

    try:
        return onnx_files(detector)
    except Exception as exc:  # the trained model is worth saving whatever the exporter says
        log(f"note: no ONNX export in this artifact ({type(exc).__name__}: {exc}); it serves "
            "with TensorFlow only ('anomaly export' can add it later)")
        return {}


def run_evaluate(artifact: str | Path, *, dataset: str | None = None,
                 test_data: str | None = None, cache_dir: str | None = None,
                 test_limit: int | None = None):
    """Evaluate a saved artifact on its run's test split (or another data set's).

    Returns:
        ``(detector, evaluation)``.
    """
    from anomaly.detector import Detector

    det = Detector.load(artifact)
    test = load_test_set(det.path_, det.metadata_, dataset=dataset, test_data=test_data,
                         cache_dir=cache_dir, test_limit=test_limit, seed=det.seed,
                         image_shape=det.image_shape_)
    return det, evaluate_test_set(det, test)[1]


#: Test images scored per call when error maps are kept for the pixel metrics (bounds memory).
_MAP_CHUNK = 256


def evaluate_test_set(detector, test: TestSet):
    """Score a labelled test set and evaluate it; with masks (MVTec AD layout), the per-pixel
    error maps also give the pixel metrics (pixel AUROC, PRO).

    Returns:
        ``(scores (N,), evaluation)``.
    """
    from anomaly.evaluation import add_pixel_metrics, evaluate

    if test.masks is None:
        scores = in_chunks(detector.decision_function, test.x, "Evaluating")
        return scores, evaluate(scores, test.y, detector.calibration_, test.classes,
                                test.class_names)
    score_parts, maps = [], []
    for i in range(0, len(test.x), _MAP_CHUNK):
        out = detector.detect(test.x[i:i + _MAP_CHUNK], error_map=True)
        score_parts.append(out.scores)
        err = out.error_map
        # A pixel's error is the mean over its channels: masks are per pixel.
        maps.append((err.mean(axis=-1) if err.ndim == 4 else err).astype(np.float32))
    scores = np.concatenate(score_parts)
    ev = evaluate(scores, test.y, detector.calibration_, test.classes, test.class_names)
    add_pixel_metrics(ev, np.concatenate(maps), test.masks, test.has_mask, test.classes)
    return scores, ev
