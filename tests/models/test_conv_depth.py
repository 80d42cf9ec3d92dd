"""The conv depth rule: stride-2 stages until the map is <= 8 px, filters doubling; MNIST's
architecture unchanged; every model from 16x16 to 256x256."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.errors import ConfigError
from anomaly.models import networks
from anomaly.models.autoencoder import MODELS, Autoencoder
from anomaly.models.networks import conv_filters, conv_stages


@pytest.mark.parametrize(("size", "stages"), [((8, 8), 0), ((16, 16), 1), ((17, 23), 2),
                                              ((28, 28), 2), ((32, 32), 2), ((48, 32), 3),
                                              ((64, 64), 3), ((128, 128), 4), ((128, 96), 4),
                                              ((256, 256), 5), ((512, 64), 6)])
def test_stages_until_the_map_is_at_most_8_px(size, stages):
    assert conv_stages(*size) == stages


def test_filters_double_beyond_the_configured_ones():
    assert conv_filters((128, 128, 3), (32, 64)) == (32, 64, 128, 256)
    assert conv_filters((28, 28, 1), (32, 64)) == (32, 64)
    # More configured filters than stages: the extra ones are stride-1 convolutions.
    assert conv_filters((16, 16, 1), (32, 64)) == (32, 64)
    enc = networks.conv_encoder((16, 16, 1), 4, (32, 64), False)
    assert [tuple(enc.get_layer(f"conv_{i}").output.shape[1:3]) for i in range(2)] == [(8, 8),
                                                                                       (8, 8)]


def test_mnist_architecture_is_unchanged():
    """Parameter counts and maps of conv-vae at 28x28x1 as they were before the depth rule."""
    enc = networks.conv_encoder((28, 28, 1), 16, (32, 64), True)
    dec = networks.conv_decoder((28, 28, 1), 16, (32, 64))
    assert (enc.count_params(), dec.count_params()) == (119200, 108993)
    assert [tuple(enc.get_layer(n).output.shape[1:]) for n in ("conv_0", "conv_1")] == [
        (14, 14, 32), (7, 7, 64)]


def test_128_px_colour_has_four_stages_down_to_8_px():
    enc = networks.conv_encoder((128, 128, 3), 16, (32, 64), True)
    dec = networks.conv_decoder((128, 128, 3), 16, (32, 64))
    assert tuple(enc.get_layer("conv_3").output.shape[1:]) == (8, 8, 256)
    assert tuple(dec.output.shape[1:]) == (128, 128, 3)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(16, 16, 3), (100, 60, 1), (256, 256, 1)])
def test_every_model_builds_and_reconstructs_at_native_sizes(name, shape):
    hidden = [8, 16] if name.startswith(("conv", "affine")) else [16]
    model = Autoencoder(name, shape, hidden=hidden, latent_dim=4)
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    out = np.asarray(model(x))
    assert out.shape == (2, *shape)


def test_conv_vae_at_256_px_colour():
    model = Autoencoder("conv-vae", (256, 256, 3), latent_dim=4)
    x = np.zeros((1, 256, 256, 3), np.float32)
    assert np.asarray(model(x)).shape == (1, 256, 256, 3)
    assert tuple(model.encoder.get_layer("conv_4").output.shape[1:]) == (8, 8, 512)


@pytest.mark.parametrize("shape, design, strides, side", [
    ((28, 28, 1), 2, [2, 2, 2], 4), ((16, 16, 1), 2, [2, 2, 2], 2),
    ((128, 128, 3), 2, [2, 2, 2, 2, 2], 4),
    ((28, 28, 1), 1, [2, 2, 1], 7), ((16, 16, 1), 1, [2, 1, 1], 8),
    ((128, 128, 3), 1, [2, 2, 2, 2, 1], 8)])
def test_the_transform_classifier_strides_per_design(shape, design, strides, side):
    """One convolution a stage, one stage per encoder stage plus one (at least one per
    configured filter); design 2 strides them all, design 1 only the encoder's."""
    net = networks.transform_classifier(shape, 4, (16, 32, 64), design)
    convs = [layer for layer in net.layers if layer.name.startswith("conv_")]
    assert [c.strides[0] for c in convs] == strides
    assert [c.filters for c in convs][:3] == [16, 32, 64]
    assert net.get_layer(convs[-1].name).output.shape[1:3] == (side, side)
    out = net(np.zeros((2, *shape), np.float32))
    assert tuple(out.shape) == (2, 4)


def test_an_unknown_classifier_design_is_refused():
    with pytest.raises(ConfigError, match="design of 1 or 2"):
        networks.transform_classifier((28, 28, 1), 4, (16, 32, 64), 3)


def test_a_model_saved_before_the_design_key_loads_with_design_1(tmp_path):
    """Earlier artifacts' models have no ``tp_design`` in their config: they load with the
    layout they were trained with (design 1), not today's, and score the same."""
    import json
    import zipfile

    import keras

    model = Autoencoder("conv-vae", (28, 28, 1), predict_transforms="rot4", tp_design=1,
                        seed=0)
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
    model(x)
    model.transform_net(x)
    src, old = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                del config["config"]["tp_design"]
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    loaded = keras.models.load_model(old, safe_mode=True, compile=False)
    assert loaded.tp_design == 1
    convs = [la for la in loaded.transform_net.layers if la.name.startswith("conv_")]
    assert [c.strides[0] for c in convs] == [2, 2, 1]
    np.testing.assert_allclose(np.asarray(loaded.transform_net(x)),
                               np.asarray(model.transform_net(x)), rtol=1e-6, atol=1e-6)
    assert Autoencoder("conv-vae", (28, 28, 1), predict_transforms="rot4").tp_design == 2


def test_folding_the_batch_norms_keeps_the_classifier_s_outputs():
    """The scorer's classifier has each batch norm folded into its convolution: the same
    logits, for trained (non-trivial) statistics, and the original network is untouched."""
    rng = np.random.default_rng(0)
    net = networks.transform_classifier((28, 28, 1), 4, (8, 16, 32))
    for layer in net.layers:
        if layer.name.startswith("bn_"):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 2, shapes[0]), rng.normal(0, 1, shapes[1]),
                               rng.normal(0, 1, shapes[2]), rng.uniform(0.1, 3, shapes[3])])
    before = [w.copy() for w in net.get_weights()]
    folded = networks.fold_batch_norm(net)
    assert not any(layer.name.startswith("bn_") for layer in folded.layers)
    x = rng.random((16, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(net(x, training=False)),
                               rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, net.get_weights(), strict=True))
