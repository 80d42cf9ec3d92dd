"""Recalibration without retraining: new operating points from new data, the same weights.

``anomaly calibrate ARTIFACT --normal PATH [--anomalies PATH] [--feedback]`` scores the new
normal images (and labelled anomalies, which add ``f1-max`` and ``youden``) with the artifact's
model, chooses the thresholds again (:func:`anomaly.calibration.recalibrate`) and writes a
**new version** of the same model name, whose ``metadata.json`` records its lineage: the parent
version and its hash, the data it was calibrated on, and the thresholds before and after. The
service serves it on its next reload, like any version.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.artifact import new_version_path
from anomaly.errors import DataError, expected

_log = logging.getLogger(__name__)

#: Files of the parent artifact carried over unchanged to the recalibrated version.
CARRIED = ("config.yaml", "history.csv")


@dataclass
class Recalibrated:
    path: Path
    lineage: dict
    n_normal: int
    n_anomalies: int


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes()).hexdigest()


def feedback_images(models_dir: Path, name: str, shape) -> tuple[np.ndarray | None,
                                                               np.ndarray | None, int]:
    """Normal and anomalous images from the label feedback stored for model ``name``.

    Returns:
        ``(normal, anomalies, skipped)``: arrays ``(n, H, W[, C])`` or ``None``, and how many
        records had no image (ids alone cannot be rescored).
    """
    from anomaly.data.images import to_unit_float
    from anomaly.feedback import FeedbackStore

    groups: dict[str, list] = {"normal": [], "anomaly": []}
    skipped = 0
    for record in FeedbackStore(models_dir).read(name):
        image = record.get("image")
        if image is None:
            skipped += 1
            continue
        groups[record["label"]].append(to_unit_float(np.asarray(image)[None], shape=shape,
                                                     what="a feedback image"))
    out = [np.concatenate(v) if v else None for v in (groups["normal"], groups["anomaly"])]
    return out[0], out[1], skipped


def run_calibrate(artifact: str | Path, *, normal: str | None = None,
                  anomalies: str | None = None, feedback: bool = False,
                  target_fprs: list[float] | None = None, rule: str | None = None,
                  force: bool = False, output: str | Path | None = None) -> Recalibrated:
    """Recalibrate ``artifact`` and write the result as a new version (see module docstring).

    Args:
        normal, anomalies: image files or folders (any input ``anomaly score`` reads).
        feedback: also use the label feedback stored beside the models for this model name.
        target_fprs: new ``fpr@`` targets; the artifact's when ``None``.
        output: the models directory to write into; default the artifact's own.
    """
    from anomaly.calibration import recalibrate
    from anomaly.data.images import load_images
    from anomaly.detector import Detector

    det = Detector.load(artifact)
    shape = det.image_shape_
    name = det.metadata_.get("name") or det.path_.parent.name
    models_dir = Path(output) if output is not None else det.path_.parent.parent
    parts_n, parts_a, sources = [], [], []
    if normal is not None:
        parts_n.append(load_images(normal, shape=shape).images)
        sources.append({"kind": "normal", "path": str(Path(normal).resolve())})
    if anomalies is not None:
        parts_a.append(load_images(anomalies, shape=shape).images)
        sources.append({"kind": "anomalies", "path": str(Path(anomalies).resolve())})
    if feedback:
        fb_n, fb_a, skipped = feedback_images(det.path_.parent.parent, name, shape)
        if skipped:
            _log.info("%d feedback records carry only an id and were skipped", skipped)
        for arr, group in ((fb_n, parts_n), (fb_a, parts_a)):
            if arr is not None:
                group.append(arr)
        sources.append({"kind": "feedback", "n_normal": 0 if fb_n is None else len(fb_n),
                        "n_anomalies": 0 if fb_a is None else len(fb_a)})
    if not parts_n:
        raise expected("normal images to calibrate on (--normal PATH or --feedback with "
                       "normal-labelled images)", "none", cls=DataError)
    x_normal = np.concatenate(parts_n)
    x_anom = np.concatenate(parts_a) if parts_a else None
    settings = {"rule": rule} if rule else {}
    new_cal, lineage = recalibrate(
        det.calibration_, det.decision_function(x_normal),
        det.decision_function(x_anom) if x_anom is not None else None,
        tuple(target_fprs) if target_fprs else None, force=force, **settings)
    det.calibration_ = new_cal
    det.threshold_ = new_cal.get().threshold
    lineage.update({"parent": {"name": name, "version": det.path_.name,
                               "artifact_sha256": det.artifact_sha256_},
                    "data": sources, "normal_sha256": _digest(x_normal),
                    "anomalies_sha256": _digest(x_anom) if x_anom is not None else None})
    path = new_version_path(models_dir, name)
    keep = {k: v for k, v in det.metadata_.items()
            if k not in ("format_version", "name", "version", "created_at", "libraries")}
    extra = {f: (det.path_ / f).read_bytes() for f in CARRIED if (det.path_ / f).is_file()}
    if (det.path_ / "model.onnx").is_file():
        # The graph holds the thresholds: export again rather than carry a stale one.
        from anomaly.export.onnx import onnx_files

        extra.update(onnx_files(det))
    saved = det.save(path, metadata={**keep, "name": name, "version": path.name,
                                     "lineage": lineage}, extra_files=extra)
    return Recalibrated(saved, lineage, len(x_normal), 0 if x_anom is None else len(x_anom))
