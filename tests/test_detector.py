"""The Detector API: parameters, fitting, calibration, decisions, input handling, seeding."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from anomaly.config import default_of
from anomaly.data.splits import holdout
from anomaly.detector import Detector
from anomaly.errors import ConfigError, DataError, NotFoundError
from tests.conftest import tiny_detector


def test_unfitted_detector_refuses_to_score():
    det = Detector("dense-ae")
    with pytest.raises(ConfigError, match="a fitted Detector"):
        det.decision_function(np.zeros((1, 28, 28)))
    with pytest.raises(ConfigError, match="a fitted Detector"):
        det.save("/nonexistent/never")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "gan"}, "Expected a model in"),
    ({"epochs": 0}, "epochs as an integer >= 1. Received: 0"),
    ({"epochs": 2.0}, "epochs as an integer >= 1. Received: 2.0"),
    ({"batch_size": True}, "batch_size as an integer >= 1"),
    ({"latent_dim": 0}, r"latent_dim as an integer >= 1 \(or unset for the model's default\)"),
    ({"patience": -1}, "patience as an integer >= 0"),
    ({"holdout_run": 0}, "holdout_run as an integer >= 1. Received: 0"),
    ({"learning_rate": 1.5}, r"learning_rate in \(0, 1\)"),
    ({"beta": -1.0}, "beta >= 0"),
    ({"denoise": 2.0}, r"denoise \(noise std\) in \[0, 1\]"),
    ({"score": "elbo"}, "a variational model"),
    ({"aggregation": "median"}, "an aggregation in"),
    ({"tp_transforms": "none"}, r"tp_transforms in \['auto', 'd4', 'flip4', 'rot4'\]. "
                                r"Received: 'none'"),
    ({"tp_filters": [16, 0]}, r"tp_filters as a list of integers >= 1, e.g. \[16, 32, 64\]. "
                              r"Received: \[16, 0\]"),
    ({"tp_filters": []}, r"tp_filters as a list of integers >= 1"),
])
def test_bad_hyperparameters_fail_before_training(kwargs, match, normal_images):
    params = {"model": "dense-ae", "hidden": [8], "latent_dim": 2, "epochs": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        Detector(**params).fit(normal_images[:16])


def test_fit_rejects_bad_images(normal_images):
    bad = normal_images[:16].copy()
    bad[3, 1, 1] = np.nan
    with pytest.raises(DataError, match="NaN or Inf in image 3"):
        tiny_detector().fit(bad)
    with pytest.raises(DataError, match="validation images"):
        tiny_detector().fit(normal_images[:16], x_val=np.full((4, 28, 28), -1.0))


def test_get_params_round_trip(dense_detector):
    params = dense_detector.get_params()
    assert params["model"] == "dense-ae" and params["score"] == "mse"
    assert Detector(**params).get_params() == params


def test_default_hold_out_is_the_calibration_reference(dense_detector, normal_images):
    # fit() held out round(256 * val_fraction) normal images for early stopping and calibration
    # (51 at the default 0.2), by the one hold-out rule.
    _, val_pos = holdout(256, default_of("val_fraction"), dense_detector.seed,
                         default_of("holdout_run"))
    assert dense_detector.calibration_.reference_scores.shape == (len(val_pos),) == (51,)
    assert dense_detector.calibration_.default == "fpr@1%"
    val = normal_images[val_pos]
    np.testing.assert_allclose(dense_detector.calibration_.reference_scores,
                               np.sort(dense_detector.decision_function(val)), rtol=1e-6)


def test_detect_is_consistent(dense_detector, normal_test_images, anomaly_images):
    x = np.concatenate([normal_test_images[:10], anomaly_images[:10]])
    out = dense_detector.detect(x)
    thr = dense_detector.calibration_.get().threshold
    assert out.operating_point == "fpr@1%" and out.threshold == thr
    np.testing.assert_array_equal(out.scores, dense_detector.decision_function(x))
    np.testing.assert_array_equal(out.is_anomaly, out.scores > thr)
    np.testing.assert_array_equal(out.normalized,
                                  dense_detector.calibration_.normalize(out.scores))
    np.testing.assert_array_equal(dense_detector.normalized_score(out.scores), out.normalized)
    np.testing.assert_array_equal(dense_detector.predict(x), out.is_anomaly)
    assert out.is_anomaly[10:].all()  # bars are far from every blob
    assert out.reconstruction is None and out.error_map is None
    with pytest.raises(NotFoundError, match="Received: 'f1-max'"):
        dense_detector.detect(x, operating_point="f1-max")


def test_calibration_anomalies_add_f1_max_and_youden(dense_detector, normal_test_images,
                                                     anomaly_images):
    det = copy.copy(dense_detector)  # the session detector stays as it is
    det.calibrate(normal_test_images, anomaly_images[:20])
    assert set(det.calibration_.operating_points) == {"fpr@1%", "f1-max", "youden"}
    f1 = det.calibration_.get("f1-max")
    assert f1.expected_tpr == pytest.approx(np.mean(det.decision_function(anomaly_images[:20]) > f1.threshold))
    out = det.detect(anomaly_images[20:], operating_point="youden")
    assert out.operating_point == "youden"
    np.testing.assert_array_equal(out.is_anomaly,
                                  out.scores > det.calibration_.get("youden").threshold)
    assert dense_detector.calibration_.operating_points.keys() == {"fpr@1%"}


def test_input_formats_give_the_same_scores(dense_detector, normal_test_images):
    x = normal_test_images[:8]
    as_uint8 = np.rint(x * 255).astype(np.uint8)
    ref = dense_detector.decision_function(as_uint8 / np.float32(255))
    np.testing.assert_array_equal(dense_detector.decision_function(as_uint8), ref)
    np.testing.assert_array_equal(dense_detector.decision_function(as_uint8.astype(np.float32)), ref)
    np.testing.assert_array_equal(dense_detector.decision_function(x.reshape(8, 784)),
                                  dense_detector.decision_function(x))
    np.testing.assert_array_equal(dense_detector.decision_function(x[..., None]), dense_detector.decision_function(x))
    with pytest.raises(DataError, match="NaN or Inf"):
        dense_detector.decision_function(np.full((1, 28, 28), np.nan))


def test_explicit_validation_set(normal_images, normal_test_images):
    det = tiny_detector("dense-ae", epochs=1, target_fprs=(0.05, 0.1))
    det.fit(normal_images[:128], x_val=normal_test_images)
    assert det.calibration_.reference_scores.shape == (64,)
    assert det.calibration_.default == "fpr@5%"
    assert set(det.calibration_.operating_points) == {"fpr@5%", "fpr@10%"}
    assert len(det.history_["val_loss"]) == 1


def test_a_denoising_model_removes_noise_that_a_plain_one_keeps(normal_test_images):
    """Trained on noisy inputs against clean targets (and validated the same way), the
    reconstruction of a noisy image is much closer to the clean image than that of the same
    model trained without noise (measured: 4x closer)."""
    from tests.conftest import make_blobs

    rng = np.random.default_rng(5)
    clean = normal_test_images
    noisy = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    errors = {}
    for std in (0.0, 0.2):
        # Wide enough to copy its input, noise included, unless trained not to.
        det = tiny_detector("dense-ae", hidden=[256], latent_dim=64, denoise=std, epochs=20,
                            seed=2).fit(make_blobs(768, seed=3))
        errors[std] = float(np.mean((det.reconstruct(noisy) - clean) ** 2))
    assert errors[0.2] < 0.5 * errors[0.0], errors


# -- the scikit-learn contract ------------------------------------------------------------------


def test_clone_get_params_set_params():
    from sklearn.base import clone

    det = Detector(model="vae", epochs=3, target_fprs=[0.02])
    twin = clone(det)
    assert twin is not det and twin.get_params() == det.get_params()
    assert twin.set_params(epochs=4) is twin and twin.epochs == 4 and det.epochs == 3
    assert Detector().get_params(deep=False) == Detector().get_params(deep=True)
    with pytest.raises(ValueError, match="Invalid parameter 'epoch'"):
        twin.set_params(epoch=4)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        Detector(epoch=4)


def test_fit_predict_and_fitted_attributes_follow_pyod(dense_detector, normal_images,
                                                       normal_test_images, anomaly_images):
    det = dense_detector
    x = np.concatenate([normal_test_images[:10], anomaly_images[:10]])
    assert det.predict(x).dtype == np.int64
    np.testing.assert_array_equal(det.predict(x), (det.decision_function(x)
                                                   > det.threshold_).astype(int))
    assert det.predict(x)[10:].tolist() == [1] * 10
    np.testing.assert_array_equal(det.score_samples(x), -det.decision_function(x))
    assert det.threshold_ == det.calibration_.get().threshold
    n_val = len(holdout(256, default_of("val_fraction"), det.seed,
                        default_of("holdout_run"))[1])
    assert det.decision_scores_.shape == det.labels_.shape == (256 - n_val,)
    np.testing.assert_array_equal(det.labels_,
                                  (det.decision_scores_ > det.threshold_).astype(int))


def test_fit_takes_y_and_works_in_a_pipeline(normal_images, anomaly_images):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    y = np.zeros(len(normal_images))
    det = tiny_detector("dense-ae", epochs=1).fit(normal_images, y)  # y is ignored, as in PyOD
    assert det.image_shape_ == (28, 28, 1)
    flatten = FunctionTransformer(lambda a: a.reshape(len(a), -1))
    pipe = Pipeline([("flatten", flatten), ("detector", tiny_detector("dense-ae", epochs=1))])
    pipe.fit(normal_images)
    assert pipe.named_steps["detector"].image_shape_ == (28, 28, 1)  # a square row is an image
    assert pipe.predict(anomaly_images[:5]).tolist() == [1] * 5


def test_same_seed_same_scores(normal_images, normal_test_images):
    """Two fits with the same seed are identical; a different seed gives a different model."""
    a = tiny_detector("conv-vae", seed=3).fit(normal_images[:128]).decision_function(
        normal_test_images)
    b = tiny_detector("conv-vae", seed=3).fit(normal_images[:128]).decision_function(
        normal_test_images)
    c = tiny_detector("conv-vae", seed=4).fit(normal_images[:128]).decision_function(
        normal_test_images)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_surprise_keeps_ranking_where_the_normalized_score_saturates(dense_detector,
                                                                     anomaly_images):
    out = dense_detector.detect(anomaly_images)
    top = out.normalized == 1.0
    assert top.sum() >= 2  # saturated: the bars are beyond every normal reference score
    order = np.argsort(out.scores[top])
    assert np.all(np.diff(out.surprise[top][order]) > 0)  # ranks them all the same
    assert out.surprise[top].min() > -np.log10(1 / len(dense_detector.calibration_
                                                       .reference_scores))
