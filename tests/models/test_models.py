"""The model registry: every architecture fits, scores, saves, loads and scores identically."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from anomaly.detector import Detector
from anomaly.errors import ConfigError
from anomaly.models import MODELS, AffineCoordinateDecoder, Autoencoder, get_spec
from tests.conftest import TINY


def test_registry_holds_the_seed_family():
    assert set(MODELS) == {"dense-ae", "conv-ae", "vae", "conv-vae", "affine-vae"}
    assert set(TINY) == set(MODELS)  # the parametrized test below covers every model
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.variational == (name in ("vae", "conv-vae", "affine-vae"))
        assert spec.latent_dim >= 1 and spec.hidden


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_score_save_load_identical(name, fitted, normal_images, anomaly_images, tmp_path):
    det = fitted(name)
    x = np.concatenate([normal_images[:32], anomaly_images[:32]])
    scores = det.decision_function(x)
    assert scores.shape == (64,) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert set(det.history_) >= {"loss", "val_loss", "reconstruction_loss", "kl_loss"}
    assert len(det.history_["loss"]) == 2
    if not MODELS[name].variational:
        assert det.history_["kl_loss"] == [0.0, 0.0]

    path = det.save(tmp_path / name / "1", metadata={"dataset": "blobs"})
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.decision_function(x), scores)
    assert loaded.get_params() == det.get_params()
    assert loaded.calibration_.to_dict() == det.calibration_.to_dict()
    assert loaded.metadata_["model_type"] == name and loaded.metadata_["dataset"] == "blobs"
    assert isinstance(loaded.model_, Autoencoder)
    assert loaded.model_.get_config()["architecture"] == name

    # Reconstructions and codes: right shapes, reconstructions in [0, 1], same after loading.
    recon = loaded.reconstruct(x[:5])
    assert recon.shape == (5, 28, 28) and recon.min() >= 0.0 and recon.max() <= 1.0
    np.testing.assert_allclose(recon, det.reconstruct(x[:5]), atol=1e-6)
    code_dim = TINY[name]["latent_dim"] + (6 if name == "affine-vae" else 0)
    assert loaded.model_.code_dim == code_dim
    codes = loaded.encode(x[:5])
    assert codes.shape == (5, code_dim)
    np.testing.assert_allclose(codes, det.encode(x[:5]), atol=1e-6)

    out = loaded.detect(x[:5], reconstruction=True, error_map=True)
    assert out.reconstruction.shape == out.error_map.shape == (5, 28, 28)
    np.testing.assert_allclose(out.reconstruction, recon, atol=1e-6)
    assert (out.error_map >= 0).all()

    if name == "affine-vae":
        normalized = loaded.reconstruct(x[:5], normalize=True)
        assert normalized.shape == (5, 28, 28)
        assert normalized.min() >= 0.0 and normalized.max() <= 1.0
    else:
        with pytest.raises(ConfigError, match="affine-vae model for a normalized"):
            loaded.reconstruct(x[:5], normalize=True)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_in_either_precision(name, precision, normal_images, anomaly_images):
    """``auto`` picks one of the two per machine: each is tested on every machine."""
    # The transformation classifier's loss too (its logits are cast like the others).
    params = {**TINY[name], "epochs": 1, "batch_size": 64,
              **({"score": "mse+knn+tp"} if name in ("conv-vae", "dense-ae") else {})}
    det = Detector(name, **params, precision=precision).fit(normal_images)
    assert det.precision_ == precision and det.model_.dtype_policy.name == "float32"
    assert np.isfinite(det.history_["loss"]).all()
    scores = det.decision_function(np.concatenate([normal_images[:16], anomaly_images[:16]]))
    assert scores.dtype == np.float64 and np.isfinite(scores).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras_file_loads_in_safe_mode_without_lambda(name, fitted, tmp_path):
    det = fitted(name)
    det.model_.save(tmp_path / "m.keras")
    model = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert isinstance(model, Autoencoder)

    def layers(layer):
        yield layer
        for sub in getattr(layer, "layers", []):
            yield from layers(sub)

    kinds = {type(layer).__name__ for layer in layers(model)}
    assert "Lambda" not in kinds
    config = json.dumps(model.get_config())
    assert '"architecture"' in config


def test_model_defaults_follow_the_spec():
    for name, spec in MODELS.items():
        model = Autoencoder(name, (28, 28, 1))
        assert model.latent_dim == spec.latent_dim and model.hidden == spec.hidden
        assert model.code_dim == spec.latent_dim + (6 if name == "affine-vae" else 0)
        out = model(np.zeros((2, 28, 28, 1), np.float32))
        assert tuple(out.shape) == (2, 28, 28, 1)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(32, 32, 3), (48, 32, 1), (17, 23, 1)])
def test_every_model_takes_its_shape_from_the_data(name, shape, tmp_path):
    """Colour, non-square and odd sizes: fit, save, load and score round trips."""
    rng = np.random.default_rng(0)
    x = rng.random((40, *shape), dtype=np.float32) * 0.2
    x = x[..., 0] if shape[2] == 1 else x
    det = Detector(name, **{**TINY[name], "latent_dim": 7 if name == "affine-vae" else 3},
                   epochs=1, batch_size=16).fit(x)
    assert det.image_shape_ == shape
    out = det.detect(x[:3], reconstruction=True, error_map=True)
    assert out.reconstruction.shape == x[:3].shape == out.error_map.shape
    loaded = Detector.load(det.save(tmp_path / "m" / "1"))
    assert loaded.image_shape_ == shape
    np.testing.assert_array_equal(loaded.decision_function(x[:5]), det.decision_function(x[:5]))


def test_bad_model_settings():
    with pytest.raises(ConfigError, match=r"Expected a model in \[.*'vae'\]. Received: 'gan'"):
        get_spec("gan")
    with pytest.raises(ConfigError, match="reconstruction loss"):
        Autoencoder("dense-ae", (28, 28, 1), recon_loss="l1")
    with pytest.raises(ConfigError, match="positive latent_dim"):
        Autoencoder("dense-ae", (28, 28, 1), hidden=[0])
    with pytest.raises(ConfigError, match=r"an image shape \(H, W, C\) of positive sizes"):
        Autoencoder("dense-ae", (28, 28))


def test_affine_decoder_identity_transform_matches_normalize():
    """Affine units of 0 give the identity transform: decoding with and without ``normalize``
    must then agree."""
    layer = AffineCoordinateDecoder(28, 28, units=16, depth=2)
    z = np.concatenate([np.random.default_rng(0).normal(size=(3, 4)), np.zeros((3, 6))],
                       axis=1).astype(np.float32)
    a = np.asarray(layer(z))
    b = np.asarray(layer(z, normalize=True))
    assert a.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="at least 7"):
        AffineCoordinateDecoder(28, 28)(np.zeros((1, 6), np.float32))


@pytest.mark.parametrize(("unit", "axis"), [(2, 2), (5, 1)])
def test_affine_translation_of_one_pixel_shifts_the_image_by_one_pixel(unit, axis):
    """The grid spans [-1, 1] over 28 pixels, so a translation of t = 2/27 moves every pixel's
    coordinate onto its neighbour's: the decoded image is the normalized one shifted by one."""
    layer = AffineCoordinateDecoder(28, 28, units=16, depth=2, affine_scale=0.5)
    z = np.concatenate([np.random.default_rng(1).normal(size=(2, 4)), np.zeros((2, 6))],
                       axis=1).astype(np.float32)
    shifted = z.copy()
    shifted[:, 4 + unit] = np.arctanh((2 / 27) / 0.5)  # tx (unit 2) or ty (unit 5)
    moved = np.asarray(layer(shifted))[..., 0]
    plain = np.asarray(layer(z, normalize=True))[..., 0]
    cut = (slice(None), slice(None), slice(None, -1)) if axis == 2 else (
        slice(None), slice(None, -1), slice(None))
    ahead = (slice(None), slice(None), slice(1, None)) if axis == 2 else (
        slice(None), slice(1, None), slice(None))
    np.testing.assert_allclose(moved[cut], plain[ahead], atol=1e-5)
    assert np.abs(moved - plain).max() > 1e-3  # and it did move


def test_an_empty_batch_counts_for_nothing():
    """MultiWorkerMirroredStrategy hands a replica an empty batch when an epoch's last batch
    has fewer images than there are replicas: its loss must be no NaN in the epoch's mean."""
    model = Autoencoder("dense-ae", (28, 28, 1), latent_dim=4, hidden=[32], seed=0)
    empty = np.zeros((0, 28, 28, 1), np.float32)
    assert [float(v) for v in model.compute_losses(empty, training=False)] == [0.0] * 4
    batch = np.full((4, 28, 28, 1), 0.5, np.float32)
    alone = float(model.test_step(batch)["loss"])
    model.reset_metrics()
    model.test_step(empty)
    assert float(model.test_step(batch)["loss"]) == alone


def test_transformation_prediction_is_a_network_of_its_own_trained_in_the_same_steps(tmp_path):
    """predict_transforms adds a classifier whose cross-entropy joins the loss (and is tracked
    as transform_loss); transform_nll is its mean -log p(t | t(x)) over the transforms."""
    import keras

    model = Autoencoder("conv-ae", (16, 16, 1), latent_dim=4, hidden=[8], seed=0,
                        predict_transforms="rot4")
    x = np.random.default_rng(0).random((6, 16, 16, 1)).astype(np.float32)
    loss, recon, kl, tp = (float(v) for v in model.compute_losses(x, training=False))
    assert tp > 0 and loss == pytest.approx(recon + kl + tp, rel=1e-6)
    assert abs(tp - np.log(4)) < 0.5  # an untrained classifier: about chance, log(4)
    nll = np.asarray(model.transform_nll(x))
    assert nll.shape == (6,) and np.all(nll > 0)
    # By hand: the classifier's log-softmax of each rotation at its own index.
    logits = np.asarray(model.transform_net(np.concatenate(
        [np.rot90(x, k, axes=(1, 2)) for k in range(4)])))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -np.mean([logp[k * 6:(k + 1) * 6, k] for k in range(4)], axis=0)
    np.testing.assert_allclose(nll, want, rtol=1e-4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.train_on_batch(x, return_dict=True)
    assert "transform_loss" in logs
    model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert back.predict_transforms == "rot4"
    np.testing.assert_allclose(np.asarray(back.transform_nll(x)),
                               np.asarray(model.transform_nll(x)), rtol=1e-5)
    plain = Autoencoder("conv-ae", (16, 16, 1), latent_dim=4, hidden=[8], seed=0)
    assert not hasattr(plain, "transform_net") and "transform_loss" not in [
        m.name for m in plain.metrics]


def test_the_eight_symmetries_of_the_square():
    from anomaly.models.transforms import all_transforms

    x = np.random.default_rng(1).random((2, 5, 5, 1)).astype(np.float32)
    got = np.asarray(all_transforms(x, "d4"))
    assert got.shape == (8, 2, 5, 5, 1)
    flat = {got[k].tobytes() for k in range(8)}
    assert len(flat) == 8  # all distinct for a random image
    want = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    want_m = [np.rot90(x[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]
    assert {w.tobytes() for w in want + want_m} == flat


def test_stroke_jitter_thickens_or_thins_each_image_within_its_amount():
    """Each image moves toward its 3x3 dilation (more ink) or erosion (less ink) by at most the
    amount, one draw an image; 0 leaves it alone; the same seed gives the same images."""
    from anomaly.models.transforms import stroke_jitter

    x = np.zeros((64, 12, 12, 1), np.float32)
    x[:, 5:7, 2:10] = 1.0  # a bar two pixels thick
    thick = np.zeros_like(x[0])
    thick[4:8, 1:11] = 1.0  # its dilation
    got = np.asarray(stroke_jitter(x, 0.25, keras.random.SeedGenerator(0)))
    assert got.shape == x.shape and got.min() >= 0 and got.max() <= 1
    ink = got.sum(axis=(1, 2, 3)) / x[0].sum()
    # Thickened by a: ink x (1 + a * (40 - 16) / 16); thinned: the 2-pixel bar erodes to nothing.
    assert ink.max() <= 1 + 0.25 * 24 / 16 + 1e-6 and ink.min() >= 0.75 - 1e-6
    assert (ink > 1.05).any() and (ink < 0.95).any()  # both ways within one batch
    for img, r in zip(got, ink, strict=True):  # thicker images: a blend with the dilation
        if r > 1:
            a = (r - 1) * 16 / 24
            np.testing.assert_allclose(img, x[0] + a * (thick - x[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stroke_jitter(x, 0.0, None)), x)
    again = np.asarray(stroke_jitter(x, 0.25, keras.random.SeedGenerator(0)))
    np.testing.assert_array_equal(again, got)


def test_stroke_jitter_reaches_training_only_and_round_trips(tmp_path):
    x = np.zeros((8, 16, 16, 1), np.float32)
    x[:, 7:9, 3:13] = 1.0
    kw = {"latent_dim": 4, "hidden": [8], "seed": 0, "predict_transforms": "rot4"}
    plain = Autoencoder("conv-ae", (16, 16, 1), stroke_jitter=0.0, **kw)
    jit = Autoencoder("conv-ae", (16, 16, 1), stroke_jitter=0.5, **kw)
    jit.set_weights(plain.get_weights())
    seen = []
    encode = jit.encode

    def spy(x_in, training=False):
        seen.append(np.asarray(x_in))
        return encode(x_in, training=training)

    jit.encode = spy
    # Validation sees the images as they are; training the jittered ones.
    for a, b in zip(plain.compute_losses(x, training=False), jit.compute_losses(x, training=False),
                    strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    jit.compute_losses(x, training=True)
    np.testing.assert_array_equal(seen[0], x)
    ink = seen[1].sum(axis=(1, 2, 3)) / x[0].sum()
    assert (ink > 1.02).any() and (ink < 0.98).any()
    del jit.encode
    jit.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert back.stroke_jitter == 0.5
    cfg = jit.get_config()
    del cfg["stroke_jitter"]  # a model saved before the key: trained without jitter
    assert Autoencoder.from_config(cfg).stroke_jitter == 0.0
