"""``anomaly embed`` and ``anomaly denoise``/``reconstruct``: shapes and round trips.

They run in-process on the session's tiny dense autoencoder artifact (4-unit code).
"""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.cli import main
from anomaly.data.images import load_images
from anomaly.detector import Detector
from anomaly.embed import read_codes, write_codes
from tests.conftest import error_line, make_bars, make_blobs


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Labelled input: 5 blobs (class 0) and 3 bars (class 1) in an .npz."""
    path = tmp_path_factory.mktemp("in") / "mixed.npz"
    x = np.concatenate([make_blobs(5, seed=21), make_bars(3, seed=21)])
    np.savez(path, x=x, y=np.r_[np.zeros(5, int), np.ones(3, int)])
    return path


@pytest.fixture(scope="module")
def loaded(saved_artifact):
    return Detector.load(saved_artifact)


def test_embed_npy_csv_npz_round_trip(capsys, tmp_path, saved_artifact, images, loaded):
    x = load_images(images).images
    expected = loaded.encode(x)
    assert expected.shape == (8, 4)
    rc, out, err = run(capsys, "embed", saved_artifact, "--input", images, "--output",
                       tmp_path / "codes.npy")
    assert rc == 0, err
    assert "latent codes (4 units) of 8 images" in out
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (8, 4) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-6)

    assert run(capsys, "embed", saved_artifact, "--input", images, "--output",
               tmp_path / "codes.csv")[0] == 0
    back, ids, labels = read_codes(tmp_path / "codes.csv")
    np.testing.assert_array_equal(back, codes)  # 9 significant digits: float32 exactly
    assert ids == [str(i) for i in range(8)] and labels.tolist() == [0] * 5 + [1] * 3
    header = (tmp_path / "codes.csv").read_text().splitlines()[0]
    assert header == "id,label,z0,z1,z2,z3"

    assert run(capsys, "embed", saved_artifact, "--input", images, "--output",
               tmp_path / "codes.npz")[0] == 0
    back, ids, labels = read_codes(tmp_path / "codes.npz")
    np.testing.assert_array_equal(back, codes)
    assert len(ids) == 8 and labels.tolist() == [0] * 5 + [1] * 3


def test_write_read_codes_unlabelled(tmp_path):
    codes = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    write_codes(tmp_path / "c.csv", codes, ["a.png", "b.png", "c.png"])
    back, ids, labels = read_codes(tmp_path / "c.csv")
    np.testing.assert_array_equal(back, codes)
    assert ids == ["a.png", "b.png", "c.png"] and labels is None


def test_denoise_outputs_round_trip(capsys, tmp_path, saved_artifact, images, loaded):
    x = load_images(images).images
    expected = loaded.reconstruct(x)
    rc, out, err = run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                       tmp_path / "r.npy")
    assert rc == 0, err
    assert "reconstructions of 8 images" in out
    recon = np.load(tmp_path / "r.npy")
    assert recon.shape == (8, 28, 28) and recon.dtype == np.float32
    assert recon.min() >= 0 and recon.max() <= 1
    np.testing.assert_allclose(recon, expected, atol=1e-6)

    # The alias, into a folder of PNGs: read back within one grey level.
    assert run(capsys, "reconstruct", saved_artifact, "--input", images, "--output",
               tmp_path / "pngs")[0] == 0
    pngs = load_images(tmp_path / "pngs")
    assert sorted(pngs.ids) == [f"{i}.png" for i in range(8)]
    order = np.argsort([int(i.split(".")[0]) for i in pngs.ids])
    assert np.abs(pngs.images[order] - recon).max() <= 0.5 / 255 + 1e-6

    # CSV and .npz read back exactly with the project's own image loader.
    for name in ("r.csv", "r.npz"):
        assert run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                   tmp_path / name)[0] == 0
        back = load_images(tmp_path / name)
        np.testing.assert_array_equal(back.images, recon)
    assert load_images(tmp_path / "r.npz").labels.tolist() == [0] * 5 + [1] * 3

    # Reconstructions can be scored again like any input: the same shape in, the same out.
    assert loaded.decision_function(recon).shape == (8,)


def test_denoise_and_embed_bad_usage(capsys, tmp_path, saved_artifact, images):
    rc, _, err = run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                     tmp_path / "r.npy", "--normalize")
    assert rc == 2 and "affine-vae" in error_line(err)
    assert not (tmp_path / "r.npy").exists()
    rc, _, err = run(capsys, "embed", saved_artifact, "--input", images, "--output",
                     tmp_path / "codes.txt")
    assert rc == 2 and "ending in .csv, .npy, .npz" in error_line(err)
    rc, _, err = run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                     tmp_path / "one.png")
    assert rc == 2 and "folder for PNG files" in error_line(err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, _, err = run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                     tmp_path / "full")
    assert rc == 2 and "empty" in error_line(err)



def test_affine_vae_decodes_at_twice_its_size(capsys, tmp_path, fitted, images):
    """``--size 2x``: the coordinate decoder on a grid twice as fine, over the same extent,
    is the 1x reconstruction at a higher resolution."""
    from PIL import Image

    det = fitted("affine-vae")
    art = det.save(tmp_path / "models" / "affine" / "1")
    rc, out, err = run(capsys, "denoise", art, "--input", images, "--output",
                       tmp_path / "x2.npy", "--size", "2x")
    assert rc == 0, err
    assert "at 56x56" in out + err
    x2 = np.load(tmp_path / "x2.npy")
    x1 = det.reconstruct(load_images(images).images)
    assert x2.shape == (8, 56, 56) and x2.min() >= 0 and x2.max() <= 1
    down = np.stack([np.asarray(Image.fromarray(a).resize((28, 28), Image.Resampling.BOX))
                     for a in x2])
    assert np.abs(down - x1).mean() < 0.05
    np.testing.assert_allclose(det.reconstruct(load_images(images).images, scale=1), x1)


def test_size_needs_an_affine_vae_and_a_whole_scale(capsys, tmp_path, saved_artifact, images):
    rc, _, err = run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                     tmp_path / "r.npy", "--size", "2x")
    assert rc == 2 and "affine-vae artifact for --size" in error_line(err)
    for bad in ("1.5x", "0x", "9x", "big"):
        with pytest.raises(SystemExit) as exc:
            run(capsys, "denoise", saved_artifact, "--input", images, "--output",
                tmp_path / "r.npy", "--size", bad)
        assert exc.value.code == 2
        assert "a scale like 2x" in error_line(capsys.readouterr().err), bad
    assert not (tmp_path / "r.npy").exists()
