"""Training images streamed from disk (anomaly.data.stream): the same images, split, hold-out
and errors as reading them into memory, and the rule that chooses between the two.

A streamed fit itself (tf.data, the kNN memory, calibration): tests/test_training.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly.config import STREAM_MEMORY_FRACTION, default_of, resolve
from anomaly.data.prepare import prepare
from anomaly.data.stream import (
    DiskImages,
    choose_stream,
    decoded_bytes,
    open_images,
)
from anomaly.errors import ConfigError, DataError
from tests.conftest import make_bars, make_blobs


def _png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _grey(n: int, seed: int = 0, size: int = 20) -> np.ndarray:
    img = make_blobs(n, seed=seed)[:, 4 : 4 + size, 4 : 4 + size]
    return (img * 255).astype(np.uint8)


def _colour(n: int, seed: int = 0, size: int = 20) -> np.ndarray:
    g = _grey(n, seed, size)
    return np.stack([g, np.roll(g, 3, axis=1), 255 - g], axis=-1)


def _both(tmp_path, **keys):
    """The split of the same data read into memory and streamed."""
    keys = {"val_fraction": 0.2, **keys}
    memory = prepare(resolve(None, {**keys, "stream": "never"}))
    disk = prepare(resolve(None, {**keys, "stream": "always"}))
    assert isinstance(disk.x_train, DiskImages) and isinstance(disk.x_val, DiskImages)
    assert isinstance(memory.x_train, np.ndarray)
    return memory, disk


def _assert_same_split(memory, disk) -> None:
    # The very pixels (dtype, shape and every bit), so a fit on either is the same fit.
    for name in ("x_train", "x_val"):
        a, b = getattr(memory, name), getattr(disk, name).load()
        assert a.dtype == b.dtype and a.shape == b.shape == getattr(disk, name).shape, name
        assert np.array_equal(a, b), name
    for name in ("x_test", "y_test", "test_classes", "x_cal_anomalies", "test_masks"):
        a, b = getattr(memory, name), getattr(disk, name)
        assert (a is None and b is None) or np.array_equal(a, b), name
    assert memory.skipped == disk.skipped


def test_a_grey_folder_streams_the_same_images_and_hold_out(tmp_path):
    for i, img in enumerate(_grey(30)):
        _png(tmp_path / "d" / f"{i:02d}.png", img)
    memory, disk = _both(tmp_path, dataset=str(tmp_path / "d"))
    _assert_same_split(memory, disk)
    assert len(disk.x_val) == 6 and disk.x_train.shape == (24, 20, 20)


def test_the_hold_out_is_the_same_files(tmp_path):
    """The hold-out rule (splits.holdout) picks the same files from the list as images from
    the array; with --train-limit the seeded subset is drawn first in both."""
    for i, img in enumerate(_grey(40)):
        _png(tmp_path / "d" / f"{i:02d}.png", img)
    memory, disk = _both(tmp_path, dataset=str(tmp_path / "d"), train_limit=25, seed=3)
    _assert_same_split(memory, disk)
    files = [f"{i:02d}.png" for i in range(40)]
    held = [files[i] for i in disk.x_val.index]
    pixels = np.stack([np.asarray(Image.open(tmp_path / "d" / f)) for f in held]) / 255
    assert np.allclose(memory.x_val, pixels)


def test_colour_grey_files_and_resizing_are_read_as_in_memory(tmp_path):
    """Mixed sizes with --image-size, grey files among colour ones, RGB files whose pixels are
    all grey: each read exactly as the in-memory reader stacks and finishes them."""
    d = tmp_path / "d"
    for i, img in enumerate(_colour(8, size=20)):
        _png(d / f"c{i}.png", img)
    for i, img in enumerate(_grey(6, seed=1, size=24)):
        _png(d / f"g{i}.png", img)
    for i, img in enumerate(_grey(6, seed=2, size=16)):
        _png(d / f"r{i}.png", np.repeat(img[..., None], 3, axis=-1))  # RGB, grey pixels
    for keys in ({"image_size": "12x16"}, {"image_size": "12x16", "grayscale": True}):
        _assert_same_split(*_both(tmp_path, dataset=str(d), **keys))
    # All-grey data at a new size is grey again (one channel), in both.
    g = tmp_path / "g"
    for i, img in enumerate(_grey(10, size=24)):
        _png(g / f"{i}.png", np.repeat(img[..., None], 3, axis=-1))
    memory, disk = _both(tmp_path, dataset=str(g), image_size="16x16")
    _assert_same_split(memory, disk)
    assert disk.x_train.shape[1:] == (16, 16)


def test_grayscale_of_colour_images_at_their_own_size(tmp_path):
    for i, img in enumerate(_colour(10)):
        _png(tmp_path / "d" / f"{i}.png", img)
    memory, disk = _both(tmp_path, dataset=str(tmp_path / "d"), grayscale=True)
    _assert_same_split(memory, disk)
    assert disk.x_train.ndim == 3


def test_a_labelled_folder_keeps_its_test_split_and_classes(tmp_path):
    for i, img in enumerate(_grey(30)):
        _png(tmp_path / "d" / "normal" / f"{i}.png", img)
    for i, img in enumerate((make_bars(10)[:, 4:24, 4:24] * 255).astype(np.uint8)):
        _png(tmp_path / "d" / "bar" / f"{i}.png", img)
    memory, disk = _both(tmp_path, dataset=str(tmp_path / "d"), normal_classes="normal",
                         calibration_anomalies=2)
    _assert_same_split(memory, disk)
    # Only the training images and the hold-out stay on disk.
    assert isinstance(disk.x_test, np.ndarray) and isinstance(disk.x_cal_anomalies, np.ndarray)


def test_an_mvtec_folder_streams_train_good(tmp_path):
    root = tmp_path / "mv"
    for i, img in enumerate(_colour(12)):
        _png(root / "train" / "good" / f"{i}.png", img)
    for i, img in enumerate(_colour(3, seed=5)):
        _png(root / "test" / "good" / f"{i}.png", img)
        _png(root / "test" / "spot" / f"{i}.png", img)
        _png(root / "ground_truth" / "spot" / f"{i}_mask.png", np.zeros((20, 20), np.uint8))
    for keys in ({}, {"grayscale": True}, {"image_size": "16x16"}):
        _assert_same_split(*_both(tmp_path, dataset=str(root), **keys))


@pytest.mark.parametrize("layout", ["file", "shards"])
def test_npy_input_streams_rows_memory_mapped(tmp_path, layout):
    x = make_blobs(40, seed=4)
    if layout == "file":
        np.save(tmp_path / "x.npy", (x * 255).astype(np.uint8))
        dataset = tmp_path / "x.npy"
    else:  # shards of different lengths, one of them flattened rows
        dataset = tmp_path / "shards"
        dataset.mkdir()
        np.save(dataset / "a.npy", x[:15])
        np.save(dataset / "b.npy", x[15:32].reshape(17, -1))
        np.save(dataset / "c.npy", x[32:])
    memory, disk = _both(tmp_path, dataset=str(dataset))
    _assert_same_split(memory, disk)
    if layout == "shards":
        whole = np.concatenate([memory.x_train, memory.x_val])
        assert np.allclose(np.sort(whole.ravel()), np.sort(x.ravel()), atol=1e-6)


def test_mixed_sizes_give_the_in_memory_error(tmp_path):
    _png(tmp_path / "d" / "a.png", _grey(1, size=20)[0])
    _png(tmp_path / "d" / "b.png", _grey(1, size=16)[0])
    errors = []
    for stream in ("never", "always"):
        with pytest.raises(DataError, match="images of one size") as exc:
            prepare(resolve(None, {"dataset": str(tmp_path / "d"), "stream": stream}))
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    assert "Pass --image-size HxW" in errors[1]


def test_an_undecodable_file_gives_the_in_memory_error_or_is_skipped(tmp_path):
    for i, img in enumerate(_grey(12)):
        _png(tmp_path / "d" / f"{i:02d}.png", img)
    (tmp_path / "d" / "05.png").write_bytes(b"not a png")
    errors = []
    for stream in ("never", "always"):
        with pytest.raises(DataError, match=r"05\.png to be a PNG, JPEG") as exc:
            prepare(resolve(None, {"dataset": str(tmp_path / "d"), "stream": stream}))
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    keys = {"dataset": str(tmp_path / "d"), "val_fraction": 0.2}
    memory = prepare(resolve(None, {**keys, "stream": "never"}), skip_bad=True)
    disk = prepare(resolve(None, {**keys, "stream": "always"}), skip_bad=True)
    _assert_same_split(memory, disk)
    assert [f for f, _ in disk.skipped] == ["05.png"]


def test_too_small_images_are_refused_as_in_memory(tmp_path):
    for i in range(6):
        _png(tmp_path / "d" / f"{i}.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="at least 8x8 pixels"):
        prepare(resolve(None, {"dataset": str(tmp_path / "d"), "stream": "always"}))


def test_what_cannot_be_streamed_is_refused_only_with_always(tmp_path):
    np.savez(tmp_path / "x.npz", x=make_blobs(10))
    for dataset, builtin in ((str(tmp_path / "x.npz"), False), ("mnist", True)):
        assert choose_stream("auto", dataset, builtin=builtin, memory=1) is False
        assert choose_stream("never", dataset, builtin=builtin) is False
        with pytest.raises(ConfigError, match=r"to stream from disk .* --stream auto or never"):
            choose_stream("always", dataset, builtin=builtin)
    with pytest.raises(ConfigError, match=r"Expected 'stream' in \('auto', 'always', 'never'\)"):
        choose_stream("sometimes", str(tmp_path))


def test_auto_streams_when_the_decoded_images_exceed_the_budget(tmp_path, capsys):
    from anomaly.progress import NORMAL, set_verbosity

    for i, img in enumerate(_colour(20)):
        _png(tmp_path / "d" / f"{i:02d}.png", img)
    need = decoded_bytes(str(tmp_path / "d"))
    assert need == 20 * 20 * 20 * 3 * 4
    assert decoded_bytes(str(tmp_path / "d"), image_size=(10, 8), grayscale=True) == 20 * 80 * 4
    budget = int(need / STREAM_MEMORY_FRACTION)
    set_verbosity(NORMAL)
    assert choose_stream("auto", str(tmp_path / "d"), memory=budget) is False
    assert choose_stream("auto", str(tmp_path / "d"), memory=budget - 100) is True
    assert "streaming them from disk (--stream never reads them into memory)" in (
        capsys.readouterr().err)
    np.save(tmp_path / "x.npy", np.zeros((7, 12, 10, 4), np.uint8))  # alpha is dropped
    assert decoded_bytes(str(tmp_path / "x.npy")) == 7 * 12 * 10 * 3 * 4


def test_a_small_data_set_stays_in_memory_by_default(tmp_path):
    """auto on a data set far below the budget: today's in-memory arrays, unchanged."""
    from anomaly.data.layouts import load_folder
    from anomaly.data.splits import holdout

    for i, img in enumerate(_grey(20)):
        _png(tmp_path / "d" / f"{i:02d}.png", img)
    split = prepare(resolve(None, {"dataset": str(tmp_path / "d")}))
    assert isinstance(split.x_train, np.ndarray)
    images = load_folder(tmp_path / "d").images
    train, val = holdout(len(images), default_of("val_fraction"), 0, default_of("holdout_run"))
    assert np.array_equal(split.x_train, images[train])
    assert np.array_equal(split.x_val, images[val])


def test_disk_images_index_like_an_array_and_read_in_blocks(tmp_path):
    for i, img in enumerate(_grey(10)):
        _png(tmp_path / "d" / f"{i}.png", img)
    x = open_images(tmp_path / "d").images
    whole = x.load()
    view = x[np.array([7, 2, 5])][1:]
    assert view.shape == (2, 20, 20) and np.array_equal(view.read([0, 1]), whole[[2, 5]])
    assert np.array_equal(np.concatenate(list(x.blocks(3))), whole)
    assert np.array_equal(x[whole.mean(axis=(1, 2)) > 0.1].load(),
                          whole[whole.mean(axis=(1, 2)) > 0.1])
    with pytest.raises(TypeError, match="positions"):
        x[0]


def test_a_bad_npy_file_gets_the_readers_error_under_auto(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"this is not an array")
    errors = []
    for stream in ("never", "auto"):
        with pytest.raises(DataError, match="not a NumPy array") as exc:
            prepare(resolve(None, {"dataset": str(tmp_path / "bad.npy"), "stream": stream}))
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
