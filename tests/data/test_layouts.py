"""The MVTec AD layout and the run's image_size / grayscale settings, on tiny generated folders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from anomaly.config import resolve
from anomaly.data.layouts import is_mvtec, load_mvtec, parse_image_size
from anomaly.data.prepare import load_data, prepare
from anomaly.errors import ConfigError, DataError
from bench.synthetic_mvtec import DEFECTS, generate


@pytest.fixture
def mvtec(tmp_path):
    """A 32x32 colour MVTec AD folder: 12 train, 4 good test and 2 images per defect type."""
    return generate(tmp_path / "cat", n_train=12, n_test_good=4, n_test_defect=2,
                    size=(32, 32), seed=3)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_reads_the_layout_with_classes_and_masks(mvtec):
    assert is_mvtec(mvtec) and not is_mvtec(mvtec / "train")
    d = load_mvtec(mvtec)
    assert d.x_train.shape == (12, 32, 32, 3) and d.x_test.shape == (4 + 2 * 4, 32, 32, 3)
    assert d.class_names == ("good", *sorted(DEFECTS))
    assert d.classes.tolist() == [0] * 4 + [1, 1, 2, 2, 3, 3, 4, 4]
    assert d.masks.shape == (12, 32, 32) and d.masks.dtype == bool
    assert not d.masks[:4].any()                      # good images: all background
    assert all(d.masks[i].any() for i in range(4, 12))  # every defect painted something
    assert d.has_mask.all()
    # The mask marks the painted pixels: a "missing" region is flat dark ground.
    missing = d.class_names.index("missing")
    i = int(np.flatnonzero(d.classes == missing)[0])
    assert np.allclose(d.x_test[i][d.masks[i]], 0.08, atol=1 / 255)
    assert d.ids[4].startswith("colour/")


def test_missing_mask_counts_the_image_and_skips_its_pixels(mvtec, caplog):
    (mvtec / "ground_truth" / "spot" / "0001_mask.png").unlink()
    with caplog.at_level(logging.INFO, logger="anomaly.data.layouts"):
        d = load_mvtec(mvtec)
    assert len(d.x_test) == 12                          # still scored as an image
    skipped = np.flatnonzero(~d.has_mask)
    assert [d.ids[i] for i in skipped] == ["spot/0001.png"]
    assert not d.masks[skipped].any()
    assert "1 defect image(s)" in caplog.text and "left out of the pixel metrics" in caplog.text


def test_wrong_size_mask_is_refused(mvtec):
    _png(mvtec / "ground_truth" / "scratch" / "0000_mask.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(DataError, match=r"Expected the mask .*0000_mask.png to be the size of "
                                         r"its image \(32x32\). Received: 16x32"):
        load_mvtec(mvtec)


def test_empty_defect_folder_is_refused(mvtec):
    (mvtec / "test" / "dent").mkdir()
    with pytest.raises(DataError, match=r"Expected image files in the test folder .*dent. "
                                         r"Received: an empty folder"):
        load_mvtec(mvtec)


def test_image_size_resizes_images_and_masks(mvtec):
    d = load_mvtec(mvtec, image_size=(16, 24))
    assert d.x_train.shape == (12, 16, 24, 3) and d.x_test.shape == (12, 16, 24, 3)
    assert d.masks.shape == (12, 16, 24) and not d.masks[:4].any()
    full = load_mvtec(mvtec)
    # Nearest-neighbour masks keep roughly the defect's share of the image.
    assert abs(d.masks[4:].mean() - full.masks[4:].mean()) < 0.03


def test_grayscale_converts_colour(mvtec):
    d = load_mvtec(mvtec, grayscale=True)
    assert d.x_train.shape == (12, 32, 32) and d.x_test.shape == (12, 32, 32)
    colour = load_mvtec(mvtec)
    luma = colour.x_train[0] @ np.array([0.299, 0.587, 0.114], np.float32)
    # Pillow's own L conversion of the file vs ITU-R 601 on the floats: within rounding.
    np.testing.assert_allclose(d.x_train[0], luma, atol=1.5 / 255)


def test_prepare_splits_an_mvtec_root_and_keeps_masks_aligned(mvtec):
    cfg = resolve(None, {"dataset": str(mvtec), "test_limit": 7})
    split = prepare(cfg)
    test = split.test
    assert split.class_names[0] == "good" and len(split.x_train) + len(split.x_val) == 12
    assert len(test.x) == 7 and test.masks.shape == (7, 32, 32) and test.has_mask.shape == (7,)
    # The subset of masks is the subset of images: good images have empty masks, defects not.
    assert all(test.masks[i].any() == (test.classes[i] != 0) for i in range(7))
    assert test.y.tolist() == (test.classes != 0).astype(int).tolist()
    with pytest.raises(ConfigError, match="--normal-class good"):
        prepare(resolve(None, {"dataset": str(mvtec), "normal_classes": "spot"}))


def test_mixed_sizes_need_image_size(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(20, 20), (20, 20), (24, 16), (20, 20), (24, 16)]):
        _png(tmp_path / "mixed" / f"{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"Expected images of one size \(HxW\) to train on. "
                                         r"Received: sizes 20x20, 24x16. Pass --image-size"):
        load_data(str(tmp_path / "mixed"))
    data = load_data(str(tmp_path / "mixed"), image_size="16x12")
    assert data.x_train.shape == (5, 16, 12, 3)
    grey = load_data(str(tmp_path / "mixed"), image_size="16x12", grayscale=True)
    assert grey.x_train.shape == (5, 16, 12)


def test_grey_files_stay_grey_when_resized(tmp_path):
    for i in range(4):
        _png(tmp_path / "g" / f"{i}.png", np.full((10, 10 + i), 40 * i, np.uint8))
    assert load_data(str(tmp_path / "g"), image_size="12x12").x_train.shape == (4, 12, 12)


def test_one_pixel_images_are_refused_for_training(tmp_path):
    for i in range(4):
        _png(tmp_path / "tiny" / f"{i}.png", np.full((1, 1), 9 * i, np.uint8))
    with pytest.raises(DataError, match=r"Expected training images of at least 8x8 pixels. "
                                         r"Received: 1x1. Pass --image-size"):
        load_data(str(tmp_path / "tiny"))
    np.save(tmp_path / "tiny.npy", np.zeros((5, 1, 1), np.uint8))
    with pytest.raises(DataError, match="at least 8x8"):
        load_data(str(tmp_path / "tiny.npy"))


@pytest.mark.parametrize(("text", "want"), [("128x96", (128, 96)), ("64", (64, 64)),
                                            (" 32 X 16 ", (32, 16)), (None, None)])
def test_parse_image_size(text, want):
    assert parse_image_size(text) == want


@pytest.mark.parametrize("bad", ["abc", "4x4", "16x", "0x32", "5000x5000", "-8x8"])
def test_parse_image_size_refuses(bad):
    with pytest.raises(ConfigError, match=r"Expected image_size .*Received: "):
        parse_image_size(bad)


def test_image_size_and_grayscale_are_config_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("image_size: 64x48\ngrayscale: true\n")
    cfg = resolve(cfg_file)
    assert cfg.image_size == "64x48" and cfg.grayscale is True
    assert resolve(None).image_size is None and resolve(None).grayscale is False
    with pytest.raises(ConfigError, match="'grayscale' as bool"):
        resolve(None, {"grayscale": "yes"})


def test_cli_names_image_size_in_one_line_errors(tmp_path, capsys):
    from anomaly.cli import main

    rng = np.random.default_rng(1)
    for i, size in enumerate([(20, 20), (24, 16), (20, 20), (20, 20)]):
        _png(tmp_path / "mixed" / f"{i}.png", rng.integers(0, 255, size, dtype=np.uint8))
    out = str(tmp_path / "models")
    assert main(["fit", "--dataset", str(tmp_path / "mixed"), "--output", out]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Expected images of one size")
    assert "--image-size" in err[0] and "Traceback" not in err[0]
    assert main(["fit", "--dataset", str(tmp_path / "mixed"), "--image-size", "2x2",
                 "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Expected image_size sides in 8..1024. Received: '2x2'"]
    assert not (tmp_path / "models").exists()


def test_unresolvable_fpr_target_fails_before_training(mvtec, tmp_path, monkeypatch):
    """12 training images hold out 2: fpr@1% (499 needed) is refused before any epoch runs."""
    import anomaly.detector
    from anomaly.pipeline import run_fit

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the calibration target")

    monkeypatch.setattr(anomaly.detector.Detector, "fit", no_training)
    cfg = resolve(None, {"dataset": str(mvtec), "output": str(tmp_path / "m")})
    with pytest.raises(ConfigError, match=r"Expected at least 499 normal reference scores to "
                                          r"resolve fpr@1% .*Received: 2 \(the normal "
                                          r"hold-out; checked before training\)"):
        run_fit(cfg)
