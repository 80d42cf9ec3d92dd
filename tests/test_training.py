"""Strategy selection for tf.distribute, and a fit under a one-device MirroredStrategy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly.errors import ConfigError
from anomaly.training import choose_strategy, is_chief, make_strategy


def _tf_config(n_workers: int, task_type: str = "worker", index: int = 0, chief: bool = False):
    cluster = {"worker": [f"w{i}:2222" for i in range(n_workers)]}
    if chief:
        cluster["chief"] = ["c0:2222"]
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": task_type, "index": index}})}


@pytest.mark.parametrize(("env", "n_gpus", "want"), [
    ({}, 0, "none"),
    ({}, 1, "none"),
    ({}, 4, "mirrored"),
    (_tf_config(2), 0, "multi-worker"),
    (_tf_config(1), 0, "none"),            # a one-task cluster is no cluster
    (_tf_config(1, chief=True), 0, "multi-worker"),
    (_tf_config(3), 8, "multi-worker"),    # TF_CONFIG wins over local GPUs
])
def test_auto_strategy(env, n_gpus, want):
    assert choose_strategy("auto", env=env, n_gpus=n_gpus) == want


def test_explicit_strategy_wins_and_unknown_is_refused():
    assert choose_strategy("none", env=_tf_config(4), n_gpus=8) == "none"
    assert choose_strategy("mirrored", env={}, n_gpus=0) == "mirrored"
    with pytest.raises(ConfigError, match=r"Expected a strategy in .* Received: 'tpu'"):
        choose_strategy("tpu")


def test_bad_tf_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="Expected TF_CONFIG as JSON"):
        choose_strategy("auto", env={"TF_CONFIG": "{not json"}, n_gpus=0)


@pytest.mark.parametrize(("env", "want"), [
    ({}, True),
    (_tf_config(2, "worker", 0), True),
    (_tf_config(2, "worker", 1), False),
    (_tf_config(2, "worker", 0, chief=True), False),
    (_tf_config(2, "chief", 0, chief=True), True),
])
def test_only_the_chief_writes(env, want):
    assert is_chief(env) is want


def test_fit_under_one_device_mirrored_strategy(normal_images, anomaly_images):
    """MirroredStrategy over the CPU alone runs the same code path as several GPUs."""
    import tensorflow as tf

    from anomaly import Detector
    from anomaly.models import Autoencoder
    from anomaly.training import train

    strategy = make_strategy("mirrored", devices=["/cpu:0"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    with strategy.scope():
        model = Autoencoder("dense-ae", (28, 28, 1), latent_dim=4, hidden=[32], seed=0)
        history = train(model, normal_images[:200], normal_images[200:], epochs=2,
                        batch_size=32, learning_rate=1e-3, patience=2, verbose=0)
    assert len(history["loss"]) == 2 and np.isfinite(history["val_loss"]).all()
    det = Detector("dense-ae", force_calibration=True, latent_dim=4, hidden=[32], epochs=1, batch_size=32)
    det.fit(normal_images, distribute="none")
    assert det.strategy_ == "none"
    assert det.decision_function(anomaly_images).shape == (len(anomaly_images),)
