"""Users' images: scale and shape rules, and the .npy/.npz/.csv/PNG readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly.data.images import decode_image_bytes, load_images, to_unit_float
from anomaly.errors import DataError
from tests.conftest import make_blobs


def _digits(n: int = 5, seed: int = 0) -> np.ndarray:
    """uint8 images ``(n, 28, 28)`` with all of 0..255 present."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    return x


# -- scale --------------------------------------------------------------------------------------


def test_uint8_is_scaled_from_0_255():
    x = _digits()
    out = to_unit_float(x)
    assert out.dtype == np.float32 and out.shape == (5, 28, 28)
    np.testing.assert_allclose(out, x / 255.0, atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0


def test_integer_arrays_of_any_width_are_0_255():
    """uint8 takes a shorter path (no range check needed): bit for bit the general one's."""
    x = _digits()
    for shape in (None, (14, 14, 1), (28, 28, 3)):
        np.testing.assert_array_equal(to_unit_float(x.astype(np.int64), shape=shape),
                                      to_unit_float(x, shape=shape))


def test_floats_in_unit_interval_are_kept():
    x = make_blobs(4)
    out = to_unit_float(x.astype(np.float64))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_floats_above_one_are_0_255():
    x = _digits()
    np.testing.assert_allclose(to_unit_float(x.astype(np.float32)), to_unit_float(x), atol=1e-7)


def test_bool_images_are_black_and_white():
    x = np.zeros((2, 28, 28), bool)
    x[:, 10:12] = True
    out = to_unit_float(x)
    assert set(np.unique(out).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(("value", "match"), [
    (np.nan, "Expected finite pixel values in images. Received: NaN or Inf in image 2"),
    (np.inf, "Expected finite pixel values in images. Received: NaN or Inf in image 2"),
    (-0.5, "Expected pixel values >= 0 in images. Received: minimum -0.5"),
    (256.0, r"Expected pixel values in 0..255 \(or \[0, 1\] as floats\) in images. "
            "Received: maximum 256"),
])
def test_bad_pixel_values_are_rejected(value, match):
    x = make_blobs(3)
    x[2, 5, 5] = value
    with pytest.raises(DataError, match=match):
        to_unit_float(x)


def test_integer_values_out_of_range_are_rejected():
    with pytest.raises(DataError, match="maximum 300"):
        to_unit_float(np.full((1, 28, 28), 300, np.int32))
    with pytest.raises(DataError, match="minimum -1"):
        to_unit_float(np.full((1, 28, 28), -1, np.int32))


@pytest.mark.parametrize(("arr", "match"), [
    (np.array(["a", "b"]), "numeric pixel values"),
    (np.zeros((0, 28, 28)), "at least one image"),
    (np.float32(0.5), "at least one image"),
    (np.zeros((2, 5)), r"shape \(2, 5\)"),
    (np.zeros((2, 28, 28, 2)), r"1, 3 or 4 channels.*shape \(2, 28, 28, 2\)"),
    (np.zeros((2, 0, 28)), "non-empty height and width"),
])
def test_bad_arrays_are_rejected(arr, match):
    with pytest.raises(DataError, match=match):
        to_unit_float(arr)


def test_ragged_input_is_rejected():
    with pytest.raises(DataError, match="rectangular numeric array"):
        to_unit_float([np.zeros((28, 28)), np.zeros((20, 20))])


# -- shape --------------------------------------------------------------------------------------


def test_standard_shapes_are_equivalent(caplog):
    caplog.set_level("INFO", logger="anomaly")
    x = make_blobs(3)
    for arr in (x, x.reshape(3, 784), x[..., None]):
        out = to_unit_float(arr)
        assert out.shape == (3, 28, 28)
        np.testing.assert_array_equal(out, x)
    assert "resizing" not in caplog.text  # no note for the standard shapes


def test_other_sizes_keep_their_size_or_are_resized_to_a_model_shape_with_a_note(caplog):
    caplog.set_level("INFO", logger="anomaly")
    big = np.kron(make_blobs(2), np.ones((2, 2), np.float32))  # 56x56, the same picture
    assert to_unit_float(big).shape == (2, 56, 56)  # no target: the images' own size
    assert "resizing" not in caplog.text
    out = to_unit_float(big, shape=(28, 28, 1))
    assert out.shape == (2, 28, 28) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, make_blobs(2), atol=0.05)
    assert "resizing 2 image(s) of 56x56 to 28x28" in caplog.text


def test_colour_is_kept_or_converted_to_the_model_channels(caplog):
    caplog.set_level("INFO", logger="anomaly")
    gray = _digits(2)
    grey_model, colour_model = (28, 28, 1), (28, 28, 3)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    assert to_unit_float(rgb).shape == (2, 28, 28, 3)  # colour stays colour
    np.testing.assert_allclose(to_unit_float(rgb, shape=grey_model), to_unit_float(gray),
                               atol=1e-6)
    rgba = np.concatenate([rgb, np.full((2, 28, 28, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(to_unit_float(rgba), to_unit_float(rgb), atol=1e-6)  # alpha off
    np.testing.assert_allclose(to_unit_float(gray, shape=colour_model), to_unit_float(rgb))
    # Pure red is the ITU-R 601 luma of red.
    red = np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    assert to_unit_float(red, shape=grey_model) == pytest.approx(0.299, abs=1e-3)
    assert "32x32" in caplog.text


# -- files --------------------------------------------------------------------------------------


def test_npy(tmp_path):
    x = _digits(4)
    np.save(tmp_path / "x.npy", x)
    s = load_images(tmp_path / "x.npy")
    np.testing.assert_array_equal(s.images, to_unit_float(x))
    assert s.ids == ["0", "1", "2", "3"] and s.labels is None


def test_npz_with_labels(tmp_path):
    x, y = _digits(4), np.array([3, 1, 4, 1])
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    s = load_images(tmp_path / "d.npz")
    np.testing.assert_array_equal(s.images, to_unit_float(x))
    assert s.labels.tolist() == [3, 1, 4, 1] and s.labels.dtype == np.int64


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", pixels=_digits(2))
    with pytest.raises(DataError, match=r"an array named 'x' or 'images'.*\['pixels'\]"):
        load_images(tmp_path / "nokey.npz")
    np.savez(tmp_path / "wrong.npz", x=_digits(3), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"one label per image \(3\). Received: shape \(2,\)"):
        load_images(tmp_path / "wrong.npz")
    np.savez(tmp_path / "floaty.npz", x=_digits(2), y=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="integer class labels"):
        load_images(tmp_path / "floaty.npz")


def test_npy_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled objects, which are refused"):
        load_images(tmp_path / "obj.npy")


@pytest.mark.parametrize("content", [b"not an array at all", b"\x93NUMPY\x01\x00garbage"])
def test_unreadable_npy(tmp_path, content):
    (tmp_path / "bad.npy").write_bytes(content)
    with pytest.raises(DataError, match=r"Expected a \.npy/\.npz file"):
        load_images(tmp_path / "bad.npy")


def test_npy_with_nan(tmp_path):
    x = make_blobs(3)
    x[1, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match="NaN or Inf in image 1"):
        load_images(tmp_path / "nan.npy")


def _pixel_frame(x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(x.reshape(len(x), -1), columns=[f"p{i}" for i in range(784)])


def test_csv_with_label_and_id_columns(tmp_path):
    x = _digits(3)
    df = _pixel_frame(x)
    df.insert(0, "label", [7, 0, 7])
    df.insert(0, "id", ["a.png", "b.png", "c.png"])
    df.to_csv(tmp_path / "d.csv", index=False)
    s = load_images(tmp_path / "d.csv")
    np.testing.assert_allclose(s.images, to_unit_float(x), atol=1e-7)
    assert s.ids == ["a.png", "b.png", "c.png"]
    assert s.labels.tolist() == [7, 0, 7]


def test_csv_without_extra_columns_uses_row_numbers(tmp_path):
    x = _digits(2)
    _pixel_frame(x).to_csv(tmp_path / "d.csv", index=False)
    s = load_images(tmp_path / "d.csv")
    assert s.ids == ["0", "1"] and s.labels is None
    np.testing.assert_allclose(s.images, to_unit_float(x), atol=1e-7)


def test_csv_wrong_column_count(tmp_path):
    _pixel_frame(_digits(2)).iloc[:, :700].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match=r"a square number of pixel columns.*Received: 700 "):
        load_images(tmp_path / "short.csv")
    with pytest.raises(DataError, match=r"784 pixel columns.*Received: 700 pixel columns"):
        load_images(tmp_path / "short.csv", shape=(28, 28, 1))


def test_csv_non_numeric(tmp_path):
    df = _pixel_frame(_digits(2)).astype(object)
    df.iloc[1, 5] = "white"
    df.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DataError, match=r"numeric pixel values.*column 'p5'"):
        load_images(tmp_path / "text.csv")


def test_csv_empty(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="a CSV file of pixel rows"):
        load_images(tmp_path / "empty.csv")


def _save_png(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_with_class_subfolders(tmp_path):
    x = _digits(4)
    _save_png(tmp_path / "normal" / "a.png", x[0])
    _save_png(tmp_path / "normal" / "b.png", x[1])
    _save_png(tmp_path / "weird" / "c.png", x[2])
    _save_png(tmp_path / ".hidden" / "d.png", x[3])  # hidden folders are skipped
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    s = load_images(tmp_path)
    assert s.ids == ["normal/a.png", "normal/b.png", "weird/c.png"]
    assert s.class_names == ("normal", "weird")
    assert s.labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(s.images, to_unit_float(x[:3]), atol=1e-7)  # PNG is lossless


def test_flat_folder_has_no_labels_and_mixed_sizes_need_a_shape(tmp_path, caplog):
    caplog.set_level("INFO", logger="anomaly")
    _save_png(tmp_path / "a.png", _digits(1)[0])
    _save_png(tmp_path / "b.png", np.zeros((40, 30), np.uint8))
    with pytest.raises(DataError, match=r"images of one size .*Received: sizes 28x28, 40x30"):
        load_images(tmp_path)
    s = load_images(tmp_path, shape=(28, 28, 1))  # e.g. a model's
    assert s.images.shape == (2, 28, 28) and s.labels is None
    assert "40x30" in caplog.text  # the note about the 40x30 image


def test_single_png_rgba_transparent_is_black(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent except a bar
    rgba[10:14, :, 3] = 255
    _save_png(tmp_path / "one.png", rgba)
    s = load_images(tmp_path / "one.png")
    assert s.ids == ["one.png"] and s.images.shape == (1, 28, 28)
    assert s.images[0, 10:14].min() == 1.0 and s.images[0, :10].max() == 0.0


def test_colour_png_stays_colour(tmp_path):
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[..., 0] = 200  # red: not grey
    _save_png(tmp_path / "red.png", rgb)
    s = load_images(tmp_path / "red.png")
    assert s.images.shape == (1, 20, 24, 3)
    np.testing.assert_allclose(s.images[0, ..., 0], 200 / 255, atol=1e-6)
    assert load_images(tmp_path / "red.png", shape=(20, 24, 1)).images.shape == (1, 20, 24)


def test_hostile_array_files_are_clean_errors(tmp_path):
    """A pickled object array, or a header claiming more than the file or memory holds."""
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickled objects, which are refused"):
        load_images(tmp_path / "obj.npz")
    np.save(tmp_path / "obj.npy", np.array([1, None], dtype=object))
    with pytest.raises(DataError, match="pickled objects, which are refused"):
        load_images(tmp_path / "obj.npy")
    from numpy.lib import format as npformat

    for name, shape in (("huge.npy", (10**12, 28, 28)), ("short.npy", (100, 28, 28))):
        with open(tmp_path / name, "wb") as fp:
            npformat.write_array_header_1_0(fp, {"descr": "<f4", "fortran_order": False,
                                                 "shape": shape})
            fp.write(b"\0" * 64)
    with pytest.raises(DataError, match=r"at most 8 GiB.*shape \(1000000000000, 28, 28\)"):
        load_images(tmp_path / "huge.npy")
    with pytest.raises(DataError, match=r"as long as its header says.*holding"):
        load_images(tmp_path / "short.npy")


def test_corrupt_image_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match="to be a PNG, JPEG or other image file"):
        load_images(tmp_path / "broken.png")
    with pytest.raises(DataError, match="undecodable bytes"):
        decode_image_bytes(b"hello", name="upload")


def test_empty_folder_missing_path_and_unknown_suffix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image files .* in the folder"):
        load_images(tmp_path / "empty")
    with pytest.raises(DataError, match=r"an existing file or folder of images.*\(not found\)"):
        load_images(tmp_path / "nope.npy")
    (tmp_path / "x.txt").write_text("1,2,3")
    with pytest.raises(DataError, match=r"unknown suffix '\.txt'"):
        load_images(tmp_path / "x.txt")
