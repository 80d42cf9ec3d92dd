"""The artifact file format: one self-contained, verified directory of files plus a manifest.

This module knows files, not models: it imports neither TensorFlow nor the detector. What goes
into the files is the writer's business (:meth:`anomaly.detector.Detector.save` writes
``model.keras``, ``detector.json``, ``calibration.json``, ...); this module adds

    metadata.json      format version, name, version, creation time, plus the writer's metadata
    manifest.json      SHA-256 of every other file

An artifact is written into a temporary directory next to its destination and renamed into
place, so an interrupted write never leaves a half-written artifact. Reading checks the manifest
first and refuses a tampered, incomplete or unknown-format artifact.

In a models directory, artifacts live at ``ROOT/NAME/VERSION``; versions sort by name
naturally (``v9`` before ``v10``; ``anomaly fit`` uses UTC timestamps ``YYYYMMDDTHHMMSSZ``), and
the last one is the newest. Where an artifact is expected, a model folder ``ROOT/NAME`` means its
newest version, and ``NAME@VERSION`` / ``NAME@latest`` name one inside a models directory
(:func:`resolve`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from anomaly.errors import ArtifactError, NotFoundError, expected
from anomaly.utils import atomic_dir, sha256_file

_log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
METADATA = "metadata.json"
#: Largest JSON file of an artifact read into memory (a manifest is a few hundred bytes).
MAX_JSON_BYTES = 64 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: What a file of an artifact may be given as: its bytes, its text, or a function that writes it
#: at the path it is given (e.g. ``keras.Model.save``).
FileContent = bytes | str | Callable[[Path], object]


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


def new_version_path(models_dir: str | Path, name: str) -> Path:
    """``MODELS/NAME/VERSION`` for a new version: the UTC time, with ``-2``, ``-3`` ... when
    one of that second exists already."""
    version = new_version()
    path = Path(models_dir) / name / version
    n = 1
    while path.exists():
        n += 1
        path = Path(models_dir) / name / f"{version}-{n}"
    return path


def version_key(version: str) -> tuple:
    """Sort key that orders versions naturally: ``v9 < v10``, ``...Z < ...Z-2 < ...Z-10``."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise expected(f"a {what} of letters, digits, '_', '.', '-' (at most 128, not starting "
                       "with '.' or '-')", repr(name)[:140], cls=ArtifactError)
    return name


def _dump(data) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n"


def _jsonable(o):
    if hasattr(o, "item") and callable(o.item):  # numpy scalars, without importing numpy
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_artifact(path: str | Path, files: dict[str, FileContent], *, metadata: dict,
                   overwrite: bool = False) -> Path:
    """Write an artifact directory at ``path``, atomically.

    Args:
        path: the artifact directory to create (its parent is created if needed); in a models
            directory ``ROOT/NAME/VERSION``.
        files: file name -> content (bytes, text, or a function writing the file at a path).
        metadata: provenance for ``metadata.json`` (``name`` and ``version`` default to the
            path's last two parts).
        overwrite: replace an existing artifact at ``path``.

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise expected("an artifact path that does not exist yet", f"{path} (exists)",
                       hint="Pick another --output/--name or remove it.", cls=ArtifactError)
    for reserved in (MANIFEST, METADATA):
        if reserved in files:
            raise ValueError(f"{reserved} is written by write_artifact itself")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": path.parent.name if path.parent.name else path.name,
        "version": path.name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **metadata,
    }
    with atomic_dir(path, replace=overwrite) as tmp:
        for name, content in files.items():
            if Path(name).name != name:
                raise ValueError(f"artifact file names are flat; got {name!r}")
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, str):
                target.write_text(content)
            else:
                content(target)
        (tmp / METADATA).write_text(_dump(meta))
        listed = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(_dump({"format_version": FORMAT_VERSION,
                                           "algorithm": "sha256", "files": listed}))
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise expected(f"a {what} of at most {MAX_JSON_BYTES >> 20} MiB",
                           f"{path.stat().st_size} bytes in {path}", cls=ArtifactError)
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise expected(f"a readable {what}", f"{exc.__class__.__name__} in {path}",
                       cls=ArtifactError) from None
    if not isinstance(data, dict):
        raise expected(f"a JSON object in {what}", f"a {type(data).__name__} in {path}",
                       cls=ArtifactError)
    return data


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
        manifest = _read_json(mpath, MANIFEST)
    except FileNotFoundError:
        raise expected(f"{MANIFEST} in the artifact", f"no manifest in {path}",
                       hint="The artifact is incomplete; train it again.",
                       cls=ArtifactError) from None
    files, fmt = manifest.get("files"), manifest.get("format_version")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in files.items()):
        raise expected(f"a {MANIFEST} listing file names and their SHA-256",
                       f"malformed 'files' in {mpath}", cls=ArtifactError)
    if fmt != FORMAT_VERSION:
        raise expected(f"artifact format version {FORMAT_VERSION}", repr(fmt)[:40],
                       hint="It was written by another version of anomaly: train it again "
                       "with this one.", cls=ArtifactError)
    if METADATA not in files:
        raise expected(f"{METADATA} in the manifest", "missing", cls=ArtifactError)
    present = {p.name for p in path.iterdir() if p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise expected("only the files listed in the manifest", f"unlisted {extra} in {path}",
                       hint="The artifact was modified after it was written.",
                       cls=ArtifactError)
    for fname, digest in files.items():
        fpath = path / fname
        if Path(fname).name != fname or not fpath.is_file():
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
    body = json.dumps(manifest["files"], sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()


@dataclass
class Artifact:
    """A read (and, unless asked otherwise, verified) artifact directory.

    Attributes:
        path: the directory; ``manifest``/``metadata`` its two JSON files; ``sha256`` the
            whole-artifact hash (:func:`artifact_hash`).
    """

    path: Path
    manifest: dict
    metadata: dict
    sha256: str

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def file(self, name: str) -> Path:
        if not self.has(name):
            raise expected(f"{name} in the artifact", f"not listed in {self.path}",
                           cls=ArtifactError)
        return self.path / name

    def read_text(self, name: str) -> str:
        return self.file(name).read_text()

    def json(self, name: str) -> dict:
        return _read_json(self.file(name), name)

    @property
    def metrics(self) -> dict | None:
        return self.json("metrics.json") if self.has("metrics.json") else None


def newest_version(model_dir: Path) -> Path | None:
    """The newest ``VERSION`` folder (holding a manifest) of ``MODELS/NAME``, or ``None``."""
    versions = [p for p in model_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return max(versions, key=lambda p: version_key(p.name)) if versions else None


def resolve(ref: str | Path, models_dir: str | Path | None = None) -> Path:
    """The artifact directory that ``ref`` names.

    ``ref`` is an artifact directory, a model folder ``MODELS/NAME`` (its newest version, with a
    note), or ``NAME``, ``NAME@VERSION`` or ``NAME@latest`` inside ``models_dir`` (default
    ``./models``), or ``MODELS/NAME@VERSION`` / ``MODELS/NAME@latest`` anywhere.
    """
    text = str(ref)
    path = Path(text)
    if "@" in text and not path.exists():
        name, _, version = text.rpartition("@")
        root = Path(models_dir or "models")
        if "/" in name:  # MODELS/NAME@VERSION: the models folder is in the reference
            root, name = Path(name).parent, Path(name).name
        model_dir = root / check_name(name)
        if not model_dir.is_dir():
            raise expected(f"a model named {name!r} in {root}", "none",
                           hint=f"'anomaly models {root}' lists them.", cls=NotFoundError)
        if version == "latest":
            found = newest_version(model_dir)
            if found is None:
                raise expected(f"a version of {name!r} in {root}", "none", cls=NotFoundError)
            return found
        target = model_dir / check_name(version, "version")
        if not target.is_dir():
            raise expected(f"version {version!r} of {name!r} in {root}", "none",
                           hint=f"'anomaly models {root}' lists them.", cls=NotFoundError)
        return target
    if not path.exists() and models_dir is not None and (Path(models_dir) / text).is_dir():
        path = Path(models_dir) / text
    if path.is_dir() and not (path / MANIFEST).exists():
        found = newest_version(path)
        if found is not None:
            _log.info("%s is a model folder: using its newest version %s", path, found.name)
            return found
    return path


def read_artifact(ref: str | Path, *, verify_files: bool = True,
                  models_dir: str | Path | None = None) -> Artifact:
    """Resolve (:func:`resolve`), verify (:func:`verify`) and read an artifact's JSON files."""
    path = resolve(ref, models_dir)
    if verify_files:
        manifest = verify(path)
    else:
        try:
            manifest = _read_json(path / MANIFEST, MANIFEST)
        except FileNotFoundError:
            raise expected(f"{MANIFEST} in the artifact", f"no manifest in {path}",
                           cls=ArtifactError) from None
    if not isinstance(manifest.get("files"), dict):
        raise expected(f"a {MANIFEST} listing its files", f"malformed {path / MANIFEST}",
                       cls=ArtifactError)
    try:
        meta = _read_json(path / METADATA, METADATA)
    except FileNotFoundError:
        raise expected(f"{METADATA} in the artifact", f"missing from {path}",
                       cls=ArtifactError) from None
    return Artifact(path, manifest, meta, artifact_hash(manifest))


@dataclass
class ArtifactInfo:
    path: Path
    metadata: dict
    metrics: dict | None
    sha256: str


def read_info(path: str | Path, *, verify_files: bool = True) -> ArtifactInfo:
    """Metadata, metrics and hash of an artifact without loading its model."""
    art = read_artifact(path, verify_files=verify_files)
    return ArtifactInfo(art.path, art.metadata, art.metrics, art.sha256)


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
