"""Scanning the models directory, and verifying, loading and warming up one artifact version.

Plain functions with no HTTP and no FastAPI: the registry (:mod:`service.registry`) runs them in
its load thread and decides what to serve. Layout: ``MODELS_DIR/NAME/VERSION/`` artifacts written
by ``anomaly fit``; versions sort by :func:`anomaly.artifact.version_key`, the last is the newest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomaly.artifact import version_key
from anomaly.errors import AnomalyError, ConfigError, expected
from service.shapes import image_shape, pixel_shape

#: Batch sizes run once at load time, so the first requests of each common size find their
#: graphs traced.
WARMUP_SIZES = (1, 2, 8, 64)


class Refusal(Exception):
    """A verified artifact that failed to load or warm up (``known``: failed before too)."""

    def __init__(self, message: str, sha256: str, *, known: bool = False):
        super().__init__(message)
        self.message, self.sha256, self.known = message, sha256, known


def scan(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The models directory -> ``({name: [versions, oldest first]}, problems)``.

    Folders starting with ``.`` or ``_`` are skipped (reports live in ``_reports``); entries
    that are not models are returned as readable problems. Raises :class:`ConfigError` when
    ``root`` is not a models directory at all.
    """
    from anomaly.artifact import MANIFEST, check_name

    if not root.is_dir():
        raise expected("a models directory (--models or ANOMALY_MODELS_DIR)",
                       f"{root} (not found)", cls=ConfigError)
    if (root / MANIFEST).is_file():
        raise expected("a models directory of NAME/VERSION artifacts",
                       f"the artifact {root} itself; point it at the directory two levels up",
                       cls=ConfigError)
    layout: dict[str, list[str]] = {}
    problems: list[str] = []
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith((".", "_")) or not model_dir.is_dir():
            continue
        try:
            check_name(model_dir.name)
        except AnomalyError as exc:
            problems.append(f"{model_dir.name}: {exc}")
            continue
        if (model_dir / MANIFEST).is_file():
            problems.append(f"{model_dir.name}: an artifact directly under the models "
                            "directory; move it to NAME/VERSION")
            continue
        versions = sorted((p.name for p in model_dir.iterdir()
                           if p.is_dir() and not p.name.startswith(".")), key=version_key)
        if versions:
            layout[model_dir.name] = versions
    return layout, problems


def warm_up(detector, max_images: int) -> None:
    """Run ``Detector.detect`` on zeros of each :data:`WARMUP_SIZES` (at most ``max_images``),
    with and without reconstructions; raises ``ValueError`` on non-finite scores."""
    pixels = pixel_shape(image_shape(detector))
    for n in WARMUP_SIZES:
        x = np.zeros((min(n, max_images), *pixels), np.float32)
        for full in (False, True):
            out = detector.detect(x, reconstruction=full, error_map=full, validated=True)
            if not np.isfinite(out.scores).all():
                raise ValueError("warm-up produced non-finite scores")


def load_version(path: Path, *, same_as: str | None, known_bad: str | None,
                 max_images: int):
    """Verify, load and warm up the artifact at ``path`` (blocking; the load thread), with the
    runtime :func:`anomaly.runtime.load_runtime` picks (``ANOMALY_RUNTIME``).

    Args:
        same_as: the artifact hash of the copy already in memory, if any.
        known_bad: the hash of the artifact that failed to load last time, if any.

    Returns:
        ``(detector, sha256)``; ``detector`` is ``None`` when the hash equals ``same_as`` (the
        copy in memory is reused).

    Raises:
        AnomalyError: verification failed (bad name, tampered or incomplete artifact).
        Refusal: the verified artifact did not load or warm up (``known`` when its hash is
            ``known_bad``: not tried again).
    """
    from anomaly.artifact import check_name, read_info
    from anomaly.runtime import load_runtime

    check_name(path.name, "version name")
    info = read_info(path)  # the manifest check: every file's SHA-256
    if info.sha256 == same_as:
        return None, info.sha256
    if info.sha256 == known_bad:
        raise Refusal("", info.sha256, known=True)
    try:
        detector = load_runtime(path)  # Keras, or onnxruntime without TensorFlow
        warm_up(detector, max_images)
    except Exception as exc:
        msg = str(exc) if isinstance(exc, AnomalyError) else f"{type(exc).__name__}: {exc}"
        raise Refusal(msg, info.sha256) from exc
    return detector, info.sha256
