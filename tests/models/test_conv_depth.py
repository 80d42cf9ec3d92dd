"""The conv depth rule: stride-2 stages until the map is <= 8 px, filters doubling; MNIST's
architecture unchanged; every model from 16x16 to 256x256."""

from __future__ import annotations

import numpy as np
import pytest

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
