"""The pure networks: encoders and decoders of the model family, as functional Keras models.

Nothing here knows about losses, training or thresholds (see :mod:`anomaly.models.autoencoder`
and :mod:`anomaly.training`). Every builder takes the image shape ``(H, W, C)``: encoders map
images ``(batch, H, W, C)`` to a code (variational encoders return ``[z_mean, z_log_var]``);
decoders map a code ``(batch, latent_dim)`` to pixel logits ``(batch, H, W, C)``: the sigmoid of a
logit is the reconstructed intensity in [0, 1].

The convolutional pair scales its depth with the image (:func:`conv_stages`): stride-2 stages
until the larger side of the feature map is at most :data:`MAX_MAP_SIDE` (8) pixels, the
filters doubling with each stage beyond those configured (``hidden``, e.g. 32, 64 -> 32, 64,
128, 256 at 128x128). MNIST-sized images get exactly two stages (14 then 7 px) and the
configured filters, as before the rule; 16x16 gets one, 32x32 two, 128x128 four, 256x256
five. Configured filters beyond the stages are stride-1 convolutions. The decoder starts from
a ``ceil(H/2^s) x ceil(W/2^s)`` map and crops its output to ``H x W`` when the size is not a
multiple of ``2^s``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers

from anomaly.errors import ConfigError, expected
from anomaly.models.layers import AffineCoordinateDecoder

#: The convolutional encoder halves the resolution until the larger side of its last feature
#: map is at most this many pixels: small enough for a dense code head, large enough to keep
#: where things are.
MAX_MAP_SIDE = 8


def conv_stages(height: int, width: int) -> int:
    """Stride-2 stages of the convolutional encoder/decoder for ``height x width`` images:
    the fewest halvings (rounding up) that bring ``max(H, W)`` to at most :data:`MAX_MAP_SIDE`.
    """
    stages, side = 0, max(int(height), int(width))
    while side > MAX_MAP_SIDE:
        side = math.ceil(side / 2)
        stages += 1
    return stages


def conv_filters(image_shape: tuple[int, int, int], filters: tuple[int, ...]) -> tuple[int, ...]:
    """The filters of each convolution for ``image_shape``: the configured ones, extended by
    doubling the last until there is one per stride-2 stage (:func:`conv_stages`)."""
    out = [int(f) for f in filters]
    while len(out) < conv_stages(image_shape[0], image_shape[1]):
        out.append(out[-1] * 2)
    return tuple(out)


def _code_heads(h, latent_dim: int, variational: bool):
    if variational:
        z_mean = layers.Dense(latent_dim, name="z_mean")(h)
        # Initialised near log_var = -4 so early training is not drowned in sampling noise.
        z_log_var = layers.Dense(latent_dim, name="z_log_var",
                                 bias_initializer=keras.initializers.Constant(-4.0))(h)
        return [z_mean, z_log_var]
    return layers.Dense(latent_dim, name="z")(h)


def dense_encoder(image_shape: tuple[int, int, int], latent_dim: int, hidden: tuple[int, ...],
                  variational: bool) -> keras.Model:
    x_in = keras.Input(image_shape, name="image")
    h = layers.Flatten()(x_in)
    for i, units in enumerate(hidden):
        h = layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    return keras.Model(x_in, _code_heads(h, latent_dim, variational), name="encoder")


def dense_decoder(image_shape: tuple[int, int, int], latent_dim: int,
                  hidden: tuple[int, ...]) -> keras.Model:
    z_in = keras.Input((latent_dim,), name="z")
    h = z_in
    for i, units in enumerate(reversed(hidden)):
        h = layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    h = layers.Dense(math.prod(image_shape), name="logits")(h)
    return keras.Model(z_in, layers.Reshape(image_shape)(h), name="decoder")


def conv_encoder(image_shape: tuple[int, int, int], latent_dim: int, filters: tuple[int, ...],
                 variational: bool, dense_units: int = 0) -> keras.Model:
    """Strided 3x3 convolutions (H -> H/2 -> ... -> at most 8 px, then stride 1; see
    :func:`conv_stages`), then dense code heads. Images ``(batch, H, W, C)``."""
    stages = conv_stages(image_shape[0], image_shape[1])
    filters = conv_filters(image_shape, filters)
    x_in = keras.Input(image_shape, name="image")
    h = x_in
    for i, f in enumerate(filters):
        h = layers.Conv2D(f, 3, strides=2 if i < stages else 1, padding="same",
                          activation="relu", name=f"conv_{i}")(h)
    h = layers.Flatten()(h)
    if dense_units:
        h = layers.Dense(dense_units, activation="relu", name="dense")(h)
    return keras.Model(x_in, _code_heads(h, latent_dim, variational), name="encoder")


def conv_decoder(image_shape: tuple[int, int, int], latent_dim: int, filters: tuple[int, ...],
                 dense_units: int = 0) -> keras.Model:
    """Dense to a ``ceil(H/2^s) x ceil(W/2^s)`` map (``s`` = :func:`conv_stages`), transposed
    convolutions back to logits ``(batch, H, W, C)``."""
    height, width, channels = image_shape
    stages = conv_stages(height, width)
    filters = conv_filters(image_shape, filters)
    scale = 2 ** stages
    h0, w0 = math.ceil(height / scale), math.ceil(width / scale)
    z_in = keras.Input((latent_dim,), name="z")
    h = z_in
    if dense_units:
        h = layers.Dense(dense_units, activation="relu", name="dense")(h)
    top = filters[-1]
    h = layers.Dense(h0 * w0 * top, activation="relu", name="project")(h)
    h = layers.Reshape((h0, w0, top))(h)
    for i, f in enumerate(reversed(filters)):
        up = i >= len(filters) - stages
        h = layers.Conv2DTranspose(f, 3, strides=2 if up else 1, padding="same",
                                   activation="relu", name=f"deconv_{i}")(h)
    if (h0 * scale, w0 * scale) != (height, width):
        h = layers.Cropping2D(((0, h0 * scale - height), (0, w0 * scale - width)),
                              name="crop")(h)
    h = layers.Conv2D(channels, 3, padding="same", name="logits")(h)
    return keras.Model(z_in, h, name="decoder")


def affine_decoder(image_shape: tuple[int, int, int], latent_dim: int, units: int,
                   depth: int) -> keras.Model:
    z_in = keras.Input((latent_dim,), name="z")
    height, width, channels = image_shape
    out = AffineCoordinateDecoder(height, width, channels=channels, units=units, depth=depth,
                                  name="coord_net")(z_in)
    return keras.Model(z_in, out, name="decoder")


#: The transformation classifier's layout (:func:`transform_classifier`): 2, every stage
#: strided; 1, the first strided design (stride 1 after the encoder's stages), which the
#: artifacts written before design 2 hold and still load with.
TP_DESIGN = 2


def transform_classifier(image_shape: tuple[int, int, int], n_transforms: int,
                         filters: tuple[int, ...], design: int = TP_DESIGN) -> keras.Model:
    """Which of ``n_transforms`` transforms an image ``(batch, H, W, C)`` got: logits
    ``(batch, n_transforms)``.

    One batch-normalized 3x3 convolution per stage: one stage per stride-2 stage of the encoder
    (:func:`conv_stages`) plus one, and at least one per configured filter count (the filters
    double beyond them), then global average pooling. ``design`` 2 (:data:`TP_DESIGN`) strides
    every stage (MNIST: 14, 7, then 4 pixels); design 1 strides only the encoder's stages (14,
    7, 7). Its own weights: the autoencoder is trained as before.

    Why strided and single: the first design (two convolutions a stage at full resolution,
    max-pooling between) made an epoch 2.9 s against the autoencoder's 1.05 alone and scored
    2,200 images/s; design 1 made it 1.3 s at the same AUROC (seeds 0-2, in ``mse+knn+tp``:
    MNIST 0.9868 against 0.9876, Fashion-MNIST 0.9470 against 0.9470). Design 2 halves the
    classifier's multiply-adds again (its last stage works on 4x4 instead of 7x7 maps) and
    sees more of the image per unit: better on each of the four hardest classes (seed 0, MNIST
    2 / 8, pullover / shirt: 0.9878 / 0.9613 / 0.9350 / 0.8638 against 0.9873 / 0.9594 /
    0.9297 / 0.8578). README "Benchmarks".
    """
    if design not in (1, 2):
        raise expected("a transformation classifier design of 1 or 2", repr(design),
                       cls=ConfigError)
    stages = conv_stages(image_shape[0], image_shape[1])
    widths = list(filters)
    while len(widths) < stages + 1:
        widths.append(widths[-1] * 2)
    x_in = keras.Input(image_shape, name="image")
    h = x_in
    for i, f in enumerate(widths):
        stride = 2 if design == 2 or i < stages else 1
        h = layers.Conv2D(f, 3, strides=stride, padding="same", use_bias=False,
                          name=f"conv_{i}")(h)
        h = layers.BatchNormalization(name=f"bn_{i}")(h)
        h = layers.ReLU(name=f"relu_{i}")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x_in, layers.Dense(n_transforms, name="logits")(h),
                       name="transform_classifier")


def fold_batch_norm(net: keras.Model) -> keras.Model:
    """``net`` for inference with each batch normalization folded into the convolution before
    it: the same outputs (to float32 rounding) without the normalization's passes over the
    activations, which TensorFlow's CPU graph runs as separate element-wise ops.

    For a chain of layers (as :func:`transform_classifier` builds) whose batch normalizations
    each follow a ``Conv2D``; the weights are copied, ``net`` is left as it is.
    """
    h = x_in = keras.Input(net.input_shape[1:], name=net.layers[0].name)
    pending = None  # a convolution whose normalization may follow
    for layer in net.layers[1:]:
        if isinstance(layer, layers.BatchNormalization) and pending is not None:
            w, *b = (np.asarray(v, np.float64) for v in pending.get_weights())
            gamma, beta, mean, var = (np.asarray(v, np.float64) for v in layer.get_weights())
            scale = gamma / np.sqrt(var + layer.epsilon)
            bias = beta + ((b[0] if b else 0.0) - mean) * scale
            folded = layers.Conv2D.from_config({**pending.get_config(), "use_bias": True,
                                                "dtype": "float32"})
            h = folded(h)
            folded.set_weights([(w * scale).astype(np.float32), bias.astype(np.float32)])
            pending = None
            continue
        if pending is not None:
            h = _copy_layer(pending, h)
            pending = None
        if isinstance(layer, layers.Conv2D):
            pending = layer
            continue
        h = _copy_layer(layer, h)
    if pending is not None:
        h = _copy_layer(pending, h)
    return keras.Model(x_in, h, name=f"{net.name}_folded")


def _copy_layer(layer, h):
    """``layer``'s float32 twin applied to ``h``, with its weights."""
    twin = type(layer).from_config({**layer.get_config(), "dtype": "float32"})
    out = twin(h)
    if layer.weights:
        twin.set_weights(layer.get_weights())
    return out
