"""The model artifact: one self-contained, verified directory per trained detector.

Layout (``FORMAT_VERSION`` 1)::

    model.keras        the Keras model (custom classes registered; loads with safe_mode=True)
    detector.json      format version, hyper-parameters, score definition
    calibration.json   operating points and the normal reference scores
    metadata.json      name, version, creation time, data set, normal classes, library versions
    latent_memory.npy  normal training codes, for the mse+knn score only
    config.yaml        the resolved configuration of the run that made it (when given)
    metrics.json       test-set evaluation (when evaluated)
    per_class.csv      per-class detection table (when evaluated)
    history.csv        per-epoch training losses
    manifest.json      SHA-256 of every file above

An artifact is written into a temporary directory next to its destination and renamed into
place, so an interrupted write never leaves a half-written artifact. Loading checks the
manifest first and refuses a tampered, incomplete or unknown-format artifact.

In a models directory, artifacts live at ``ROOT/NAME/VERSION``; versions sort by name
naturally (``v9`` before ``v10``; ``anomaly fit`` uses UTC timestamps ``YYYYMMDDTHHMMSSZ``), and
the last one is the newest.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.calibration import Calibration
from anomaly.errors import ArtifactError, NotFoundError, expected
from anomaly.utils import atomic_dir, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("model.keras", "detector.json", "calibration.json", "metadata.json")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("anomaly", "tensorflow", "keras", "numpy", "scikit-learn", "pandas"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def new_version() -> str:
    """A sortable version string: the UTC time, e.g. ``20261123T154700Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def version_key(version: str) -> tuple:
    """Sort key that orders versions naturally: ``v9 < v10``, ``...Z < ...Z-2 < ...Z-10``."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise expected(f"a {what} of letters, digits, '_', '.', '-' (at most 128, not starting "
                       "with '.' or '-')", repr(name), cls=ArtifactError)
    return name


def _json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_detector(detector, path: str | Path, *, metadata: dict | None = None,
                  metrics: dict | None = None, per_class: pd.DataFrame | None = None,
                  config_yaml: str | None = None, overwrite: bool = False) -> Path:
    """Write ``detector`` as an artifact directory at ``path``.

    Args:
        detector: a fitted :class:`~anomaly.detector.Detector`.
        path: the artifact directory to create (its parent is created if needed).
        metadata: extra provenance (dataset, normal_classes, class_names, name, version, ...).
        metrics, per_class: the test-set evaluation, when there is one.
        config_yaml: the resolved run configuration as YAML text.
        overwrite: replace an existing artifact at ``path``.

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise expected("an artifact path that does not exist yet", f"{path} (exists)",
                       hint="Pick another --output/--name or remove it.", cls=ArtifactError)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": path.parent.name if path.parent.name else path.name,
        "version": path.name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_type": detector.model,
        "libraries": library_versions(),
        **(metadata or {}),
    }
    with atomic_dir(path, replace=overwrite) as tmp:
        detector.model_.save(tmp / "model.keras")
        knn = getattr(detector, "knn_", None)
        _json(tmp / "detector.json", {"format_version": FORMAT_VERSION,
                                      "hyperparameters": detector.get_params(),
                                      "code_dim": int(detector.model_.code_dim),
                                      "knn": None if knn is None else {"k": knn.k,
                                                                       "stats": knn.stats}})
        if knn is not None:
            np.save(tmp / "latent_memory.npy", knn.memory)
        _json(tmp / "calibration.json", detector.calibration_.to_dict())
        _json(tmp / "metadata.json", meta)
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if metrics is not None:
            _json(tmp / "metrics.json", metrics)
        if per_class is not None:
            per_class.to_csv(tmp / "per_class.csv", index=False)
        history = getattr(detector, "history_", None)
        if history:
            n = max(len(v) for v in history.values())
            pd.DataFrame({k: v + [None] * (n - len(v)) for k, v in history.items()}).to_csv(
                tmp / "history.csv", index=False)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "algorithm": "sha256",
                               "files": files})
    return path


def verify(path: str | Path) -> dict:
    """Check an artifact's manifest: every listed file present with its SHA-256, no others.

    Returns:
        The manifest dict. Raises :class:`ArtifactError` naming what is wrong.
    """
    path = Path(path)
    if not path.is_dir():
        raise expected("an artifact directory", f"{path} (not found)",
                       hint="'anomaly models DIR' lists the artifacts in a models directory.",
                       cls=NotFoundError)
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fmt = manifest["format_version"]
    except FileNotFoundError:
        raise expected(f"{MANIFEST} in the artifact", f"no manifest in {path}",
                       hint="The artifact is incomplete; train it again.",
                       cls=ArtifactError) from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise expected(f"a readable {MANIFEST}", f"{exc.__class__.__name__} in {mpath}",
                       cls=ArtifactError) from None
    if fmt != FORMAT_VERSION:
        raise expected(f"artifact format version {FORMAT_VERSION}", fmt,
                       hint="Upgrade anomaly to read it.", cls=ArtifactError)
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise expected(f"the files {list(REQUIRED)} in the manifest", f"{missing} missing",
                       cls=ArtifactError)
    present = {p.name for p in path.iterdir() if p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise expected("only the files listed in the manifest", f"unlisted {extra} in {path}",
                       hint="The artifact was modified after it was written.",
                       cls=ArtifactError)
    for fname, digest in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise expected(f"{fname} in the artifact", f"missing from {path}",
                           hint="The artifact is incomplete.", cls=ArtifactError)
        got = sha256_file(fpath)
        if got != digest:
            raise expected(f"{fname} with SHA-256 {digest}", f"{got} in {path}",
                           hint="The artifact was modified or damaged; do not serve it.",
                           cls=ArtifactError)
    return manifest


def artifact_hash(manifest: dict) -> str:
    """One SHA-256 for the whole artifact: over its manifest's sorted file hashes."""
    import hashlib

    body = json.dumps(manifest["files"], sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()


@dataclass
class ArtifactInfo:
    path: Path
    metadata: dict
    metrics: dict | None
    sha256: str


def read_info(path: str | Path, *, verify_files: bool = True) -> ArtifactInfo:
    """Metadata, metrics and hash of an artifact without loading its model."""
    path = Path(path)
    manifest = verify(path) if verify_files else json.loads((path / MANIFEST).read_text())
    meta = json.loads((path / "metadata.json").read_text())
    metrics = (json.loads((path / "metrics.json").read_text())
               if (path / "metrics.json").is_file() else None)
    return ArtifactInfo(path, meta, metrics, artifact_hash(manifest))


def load_detector(path: str | Path, *, verify: bool = True):
    """Load a :class:`~anomaly.detector.Detector` from an artifact directory.

    The manifest is verified first (unless ``verify=False``), then the Keras model is loaded
    with ``safe_mode=True``.
    """
    import keras

    from anomaly.detector import Detector
    from anomaly.models.autoencoder import Autoencoder
    from anomaly.scoring import LatentKNN

    path = Path(path)
    info = read_info(path, verify_files=verify)
    try:
        spec = json.loads((path / "detector.json").read_text())
        params = dict(spec["hyperparameters"])
        params["target_fprs"] = tuple(params["target_fprs"])
        det = Detector(**params)
        det.calibration_ = Calibration.from_dict(
            json.loads((path / "calibration.json").read_text()))
        model = keras.models.load_model(path / "model.keras", safe_mode=True, compile=False)
        det.knn_ = None
        if spec.get("knn"):
            memory = np.load(path / "latent_memory.npy", allow_pickle=False)
            det.knn_ = LatentKNN(memory, k=int(spec["knn"]["k"]), stats=spec["knn"]["stats"])
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise expected("a loadable artifact", f"{exc.__class__.__name__}: {exc} in {path}",
                       cls=ArtifactError) from None
    if not isinstance(model, Autoencoder):
        raise expected("an anomaly Autoencoder model", type(model).__name__, cls=ArtifactError)
    det.model_ = model
    det.metadata_ = info.metadata
    det.metrics_ = info.metrics
    det.artifact_sha256_ = info.sha256
    det.path_ = path
    return det


def list_artifacts(root: str | Path) -> list[ArtifactInfo]:
    """Every artifact under ``root`` (``ROOT/NAME/VERSION`` or ``ROOT/VERSION``), unverified."""
    root = Path(root)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "not found"
        raise expected("a models directory", f"{root} ({what})", cls=NotFoundError)
    out = []
    for manifest in sorted(root.glob("**/" + MANIFEST)):
        if any(part.startswith(".") for part in manifest.relative_to(root).parts):
            continue  # temporary or replaced directories of an in-progress write
        try:
            out.append(read_info(manifest.parent, verify_files=False))
        except (OSError, ValueError, KeyError):
            continue
    return out
