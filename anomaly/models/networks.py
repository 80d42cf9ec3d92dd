"""The pure networks: encoders and decoders of the model family, as functional Keras models.

Nothing here knows about losses, training or thresholds (see :mod:`anomaly.models.autoencoder`
and :mod:`anomaly.training`). Encoders map images ``(batch, 28, 28)`` to a code; variational
encoders return ``[z_mean, z_log_var]``. Decoders map a code ``(batch, latent_dim)`` to pixel
logits ``(batch, 28, 28)``: the sigmoid of a logit is the reconstructed intensity in [0, 1].
"""

from __future__ import annotations

import keras
from keras import layers

from anomaly.models.layers import AffineCoordinateDecoder

IMAGE_SHAPE = (28, 28)


def _code_heads(h, latent_dim: int, variational: bool):
    if variational:
        z_mean = layers.Dense(latent_dim, name="z_mean")(h)
        # Initialised near log_var = -4 so early training is not drowned in sampling noise.
        z_log_var = layers.Dense(latent_dim, name="z_log_var",
                                 bias_initializer=keras.initializers.Constant(-4.0))(h)
        return [z_mean, z_log_var]
    return layers.Dense(latent_dim, name="z")(h)


def dense_encoder(latent_dim: int, hidden: tuple[int, ...], variational: bool) -> keras.Model:
    x_in = keras.Input(IMAGE_SHAPE, name="image")
    h = layers.Flatten()(x_in)
    for i, units in enumerate(hidden):
        h = layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    return keras.Model(x_in, _code_heads(h, latent_dim, variational), name="encoder")


def dense_decoder(latent_dim: int, hidden: tuple[int, ...]) -> keras.Model:
    z_in = keras.Input((latent_dim,), name="z")
    h = z_in
    for i, units in enumerate(reversed(hidden)):
        h = layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    h = layers.Dense(IMAGE_SHAPE[0] * IMAGE_SHAPE[1], name="logits")(h)
    return keras.Model(z_in, layers.Reshape(IMAGE_SHAPE)(h), name="decoder")


def conv_encoder(latent_dim: int, filters: tuple[int, ...], variational: bool,
                 dense_units: int = 0) -> keras.Model:
    """Strided 3x3 convolutions (28 -> 14 -> 7), then dense code heads."""
    x_in = keras.Input(IMAGE_SHAPE, name="image")
    h = layers.Reshape((*IMAGE_SHAPE, 1))(x_in)
    for i, f in enumerate(filters):
        h = layers.Conv2D(f, 3, strides=2 if i < 2 else 1, padding="same", activation="relu",
                          name=f"conv_{i}")(h)
    h = layers.Flatten()(h)
    if dense_units:
        h = layers.Dense(dense_units, activation="relu", name="dense")(h)
    return keras.Model(x_in, _code_heads(h, latent_dim, variational), name="encoder")


def conv_decoder(latent_dim: int, filters: tuple[int, ...], dense_units: int = 0) -> keras.Model:
    """Dense to a 7x7 map, then transposed convolutions back to 28x28 logits."""
    z_in = keras.Input((latent_dim,), name="z")
    h = z_in
    if dense_units:
        h = layers.Dense(dense_units, activation="relu", name="dense")(h)
    top = filters[-1]
    h = layers.Dense(7 * 7 * top, activation="relu", name="project")(h)
    h = layers.Reshape((7, 7, top))(h)
    for i, f in enumerate(reversed(filters)):
        h = layers.Conv2DTranspose(f, 3, strides=2 if i >= len(filters) - 2 else 1,
                                   padding="same", activation="relu", name=f"deconv_{i}")(h)
    h = layers.Conv2D(1, 3, padding="same", name="logits")(h)
    return keras.Model(z_in, layers.Reshape(IMAGE_SHAPE)(h), name="decoder")


def affine_decoder(latent_dim: int, units: int, depth: int) -> keras.Model:
    z_in = keras.Input((latent_dim,), name="z")
    out = AffineCoordinateDecoder(*IMAGE_SHAPE, units=units, depth=depth, name="coord_net")(z_in)
    return keras.Model(z_in, out, name="decoder")
