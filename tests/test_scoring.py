"""Anomaly scores against NumPy re-computations; higher = more anomalous."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly.errors import ConfigError
from anomaly.scoring import AGGREGATIONS, Scorer


def _bce(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Binary KL per pixel: cross-entropy minus the pixel's own entropy (0 when p == x)."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    xc = np.clip(x.astype(np.float64), 1e-7, 1 - 1e-7)
    cross = -(x * np.log(p) + (1 - x) * np.log(1 - p))
    entropy = -(xc * np.log(xc) + (1 - xc) * np.log(1 - xc))
    return np.maximum(cross - entropy, 0.0)


def test_bce_is_zero_for_a_perfect_reconstruction():
    from anomaly.scoring import _bernoulli_kl

    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    logits = np.log(x / (1 - x))
    err = np.asarray(_bernoulli_kl(x, logits))
    assert err.max() < 1e-4
    assert np.asarray(_bernoulli_kl(x, logits + 1.0)).min() > 0


def _aggregate(err: np.ndarray, how: str) -> np.ndarray:
    flat = err.reshape(len(err), -1)
    if how == "mean":
        return flat.mean(1)
    if how == "sum":
        return flat.sum(1)
    if how == "max":
        return flat.max(1)
    return np.sort(flat, axis=1)[:, -78:].mean(1)  # top10: the largest 10% (78 of 784 pixels)


@pytest.fixture(scope="module")
def x(normal_test_images, anomaly_images):
    return np.concatenate([normal_test_images[:20], anomaly_images[:20]])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_mse_matches_numpy(dense_detector, x, aggregation):
    recon = dense_detector.reconstruct(x)
    out = Scorer(dense_detector.model_, "mse", aggregation)(x, reconstruction=True,
                                                           error_map=True)
    err = (x.astype(np.float64) - recon) ** 2
    np.testing.assert_allclose(out.scores, _aggregate(err, aggregation), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.reconstruction[..., 0], recon, atol=1e-6)
    np.testing.assert_allclose(out.error_map[..., 0], err, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_bce_matches_numpy(dense_detector, x, aggregation):
    recon = dense_detector.reconstruct(x)
    scores = Scorer(dense_detector.model_, "bce", aggregation)(x).scores
    np.testing.assert_allclose(scores, _aggregate(_bce(x, recon), aggregation), rtol=1e-3)


def test_elbo_is_deterministic_negative_elbo_at_posterior_mean(fitted, x):
    det = fitted("vae")
    assert det.score == "elbo"
    model = det.model_
    z_mean, z_log_var = (np.asarray(t, np.float64) for t in model.encode(x[..., None]))
    recon = det.reconstruct(x)
    kl = -0.5 * np.sum(1 + z_log_var - z_mean**2 - np.exp(z_log_var), axis=1)
    want = _bce(x, recon).sum(axis=(1, 2)) + model.beta * kl
    scores = det.decision_function(x)
    np.testing.assert_allclose(scores, want, rtol=1e-3)
    np.testing.assert_array_equal(det.decision_function(x), scores)  # no sampling by default


def test_elbo_monte_carlo_on_request(fitted, x, monkeypatch):
    model = fitted("vae").model_
    deterministic = Scorer(model, "elbo")(x).scores
    mc = Scorer(model, "elbo", mc_samples=4)(x).scores
    assert mc.shape == deterministic.shape and np.isfinite(mc).all()
    assert not np.array_equal(mc, deterministic)  # samples z ~ q(z|x)
    # With a sampler that returns the posterior mean, the average over samples is exactly the
    # deterministic score: the Monte Carlo path averages what it samples, nothing else.
    monkeypatch.setattr(model, "sampler", lambda inputs: inputs[0])
    np.testing.assert_allclose(Scorer(model, "elbo", mc_samples=3)(x).scores, deterministic,
                               rtol=1e-6)


def test_scores_do_not_depend_on_batch_size(dense_detector, x):
    a = Scorer(dense_detector.model_, "mse", "mean", batch_size=1024)(x).scores
    b = Scorer(dense_detector.model_, "mse", "mean", batch_size=7)(x).scores
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("model", ["conv-vae", "dense-ae"])
def test_a_score_does_not_depend_on_what_else_is_in_the_batch(model, normal_images,
                                                              anomaly_images):
    """The recommended mse+knn+tp score: the same image scores the same alone, in a batch of 8, of
    64 and of 1024 (within 1e-6 relative), since the kNN cancellation and small-batch kernels
    are both taken care of."""
    from anomaly import Detector
    from tests.conftest import TINY

    det = Detector(model, force_calibration=True, **{k: v for k, v in TINY[model].items()
                             if k in ("hidden", "latent_dim")},
                   epochs=1, batch_size=32).fit(normal_images)
    assert det.score == "mse+knn+tp"
    x = np.concatenate([normal_images] * 3 + [anomaly_images] * 5)[:1024]
    full = det.decision_function(x)
    for size in (1, 3, 8, 64):
        part = np.concatenate([det.decision_function(x[i : i + size])
                               for i in range(0, 64, size)])[:64]
        np.testing.assert_allclose(part, full[:64], rtol=1e-6, atol=1e-9)


def test_empty_input_gives_empty_scores(dense_detector):
    out = Scorer(dense_detector.model_, "mse", "mean")(np.zeros((0, 28, 28), np.float32))
    assert out.scores.shape == (0,)


def test_higher_score_means_more_anomalous(dense_detector, normal_test_images, anomaly_images):
    normal = dense_detector.decision_function(normal_test_images)
    anomalous = dense_detector.decision_function(anomaly_images)
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    assert roc_auc_score(y, np.r_[normal, anomalous]) > 0.9


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"score": "l1"}, r"Expected a score in \('mse', 'bce', 'elbo', 'mse\+knn', 'mse\+knn\+tp'\)"
                      r". Received: 'l1'"),
    ({"score": "mse+knn+tp"}, "a model trained with transformation prediction for the "
                              "'mse\\+knn\\+tp' score. Received: dense-ae without it"),
    ({"score": "elbo"}, "a variational model .* for the 'elbo' score. Received: dense-ae"),
    ({"aggregation": "median"}, "Expected an aggregation in"),
    ({"mc_samples": -1}, "mc_samples as an integer >= 0"),
    ({"mc_samples": 1.5}, "mc_samples as an integer >= 0"),
])
def test_bad_score_settings(dense_detector, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Scorer(dense_detector.model_, **kwargs)


def test_mse_knn_is_standardized_sum_of_log_parts(normal_images, normal_test_images,
                                                   anomaly_images):
    """mse+knn = z(log mse) + z(log kNN distance), both standardized on normal validation."""
    from anomaly import Detector

    det = Detector("dense-ae", force_calibration=True, hidden=[32], latent_dim=4, epochs=2, batch_size=32,
                   score="mse+knn", aggregation="mean", knn_k=3, seed=0)
    det.fit(normal_images[:160], x_val=normal_images[160:220])
    knn = det.knn_
    assert knn.memory.shape == (160, 4) and knn.k == 3
    std = det.standardizer_
    assert len(std.mean) == len(std.std) == 2
    x = np.concatenate([normal_test_images[:30], anomaly_images[:30]])
    z = det.encode(x).astype(np.float64)
    d2 = ((z[:, None, :] - knn.memory[None].astype(np.float64)) ** 2).sum(-1)
    knn_d = np.sort(d2, axis=1)[:, :3].mean(1)
    mse = ((x - det.reconstruct(x)) ** 2).reshape(len(x), -1).mean(1)
    (m1, m2), (s1, s2) = std.mean, std.std
    want = (np.log(mse + 1e-12) - m1) / s1 + (np.log(knn_d + 1e-12) - m2) / s2
    np.testing.assert_allclose(det.decision_function(x), want, rtol=1e-3, atol=1e-3)
    # Standardized on normal validation images: their scores centre near 0.
    val = det.decision_function(normal_images[160:220])
    assert abs(val.mean()) < 0.5
    assert det.decision_function(anomaly_images).mean() > det.decision_function(normal_test_images).mean()


def test_mse_knn_survives_save_and_load(tmp_path, normal_images, normal_test_images):
    from anomaly import Detector

    det = Detector("dense-ae", force_calibration=True, hidden=[32], latent_dim=4, epochs=1, batch_size=32,
                   score="mse+knn", knn_memory=50, seed=0).fit(
        normal_images[:160], x_val=normal_images[160:220])
    assert det.knn_.memory.shape == (50, 4)
    path = det.save(tmp_path / "m" / "1")
    assert (path / "latent_memory.npy").is_file()
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.decision_function(normal_test_images), det.decision_function(normal_test_images))


def test_training_scores_leave_their_own_code_out(normal_images):
    """decision_scores_ of memory members skip their own code: the kNN part equals the mean
    distance to the k nearest *other* training codes (NumPy), never 0."""
    from anomaly import Detector

    det = Detector("dense-ae", force_calibration=True, hidden=[32], latent_dim=4, epochs=1,
                   batch_size=32, knn_k=3, seed=0).fit(normal_images)
    from anomaly.config import default_of
    from anomaly.data.splits import holdout

    train_pos, _ = holdout(256, default_of("val_fraction"), 0, default_of("holdout_run"))
    x = normal_images[train_pos]
    z = det.encode(x).astype(np.float64)
    d2 = ((z[:, None, :] - det.knn_.memory[None].astype(np.float64)) ** 2).sum(-1)
    others = np.sort(d2, axis=1)[:, 1:4].mean(1)  # column 0 is the image itself
    loo = det.scorer.parts(x, leave_one_out=True)[:, 1]
    np.testing.assert_allclose(loo, np.log(others + 1e-12), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(det.decision_scores_, det.scorer.combine(
        det.scorer.parts(x, leave_one_out=True)), rtol=1e-12)
    assert (det.scorer.parts(x)[:, 1] < loo).all()  # counting itself (distance 0) is optimistic


def test_batches_are_padded_to_a_short_ladder_of_sizes():
    """Few distinct shapes (each costs kept kernel memory), little padding, never above step."""
    from anomaly.scoring import ROW_BLOCK, padded_rows

    sizes = [padded_rows(n, 1024) for n in range(1, 1025)]
    assert len(set(sizes)) <= 24
    for n, size in enumerate(sizes, start=1):
        assert n <= size <= 1024 and size % ROW_BLOCK == 0
        assert n < 64 or size <= 1.25 * n
    assert padded_rows(1000, 1000) == 1000 and padded_rows(9, 8) == 8


def test_mse_knn_tp_adds_the_log_transform_nll_as_a_third_standardized_part(
        normal_images, normal_test_images, anomaly_images):
    from anomaly import Detector

    det = Detector("conv-ae", force_calibration=True, hidden=[8, 16], latent_dim=4, epochs=2,
                   batch_size=32, score="mse+knn+tp", seed=0).fit(normal_images)
    assert det.model_.predict_transforms == "rot4"  # auto, for square images
    assert det.scorer.part_names == ("log_mse", "log_knn", "log_tp")
    x = np.concatenate([normal_test_images[:20], anomaly_images[:20]])
    parts = det.scorer.parts(x)
    x4 = x[..., None]
    np.testing.assert_allclose(parts[:, 2], np.log(np.asarray(det.model_.transform_nll(x4))
                                                   + 1e-6), rtol=1e-5)
    std = det.standardizer_
    np.testing.assert_allclose(det.decision_function(x),
                               ((parts - std.mean) / std.std).sum(1), rtol=1e-9)
    # Non-square images cannot be rotated by 90 degrees: auto predicts flips instead.
    wide = Detector("conv-ae", force_calibration=True, hidden=[8], latent_dim=4, epochs=1,
                    batch_size=32, score="mse+knn+tp", seed=0).fit(normal_images[:, :, :20])
    assert wide.model_.predict_transforms == "flip4"
