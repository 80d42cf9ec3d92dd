"""Custom Keras layers, registered so that ``.keras`` files load with ``safe_mode=True``."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

PACKAGE = "anomaly"


@keras.saving.register_keras_serializable(package=PACKAGE)
class Sampling(keras.layers.Layer):
    """Reparameterization trick: ``z = mean + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)``.

    Inputs: ``[z_mean, z_log_var]``, each ``(batch, latent_dim)``. Output: ``(batch, latent_dim)``.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), dtype=z_mean.dtype, seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def _pixel_grid(height: int, width: int) -> np.ndarray:
    """Homogeneous pixel-centre coordinates in [-1, 1], shape ``(height * width, 3)``."""
    ys, xs = np.meshgrid(np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width),
                         indexing="ij")
    return np.stack([xs.ravel(), ys.ravel(), np.ones(height * width)], axis=1).astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class AffineCoordinateDecoder(keras.layers.Layer):
    """Coordinate-network decoder with an explicit affine transform of the pixel grid.

    The latent code is split into content units and 6 affine units. The affine units give a
    2x3 matrix ``A = [I | 0] + scale * tanh(units)`` that moves each pixel's (x, y) before an MLP
    maps ``(A @ [x, y, 1], content)`` to that pixel's intensity logit. Because the MLP sees the
    content only through coordinates it cannot move itself, rotation, shear, scale and shift are
    pushed into the affine units, and decoding with ``A = [I | 0]`` (``normalize=True``) gives
    the "normalized" image: the same content, straightened.

    Input: latent ``(batch, content_dim + 6)``. Output: logits ``(batch, height, width,
    channels)``. The pixel grid is the only place the size appears: the weights are
    resolution-free.
    """

    def __init__(self, height: int, width: int, channels: int = 1, units: int = 128,
                 depth: int = 3, affine_scale: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width, self.channels = height, width, channels
        self.units, self.depth, self.affine_scale = units, depth, affine_scale
        self.grid = _pixel_grid(height, width)

    def build(self, input_shape):
        content_dim = int(input_shape[-1]) - 6
        if content_dim < 1:
            raise ValueError(f"Expected a latent size of at least 7 (content + 6 affine units). "
                             f"Received: {input_shape[-1]}")
        self.coord_kernel = self.add_weight(shape=(2, self.units), initializer="glorot_uniform",
                                            name="coord_kernel")
        self.content_kernel = self.add_weight(shape=(content_dim, self.units),
                                              initializer="glorot_uniform", name="content_kernel")
        self.first_bias = self.add_weight(shape=(self.units,), initializer="zeros",
                                          name="first_bias")
        self.hidden = [keras.layers.Dense(self.units, activation="relu", name=f"hidden_{i}")
                       for i in range(self.depth - 1)]
        self.out = keras.layers.Dense(self.channels, name="pixel_logit")
        shape = (None, self.height * self.width, self.units)
        for layer in self.hidden:
            layer.build(shape)
        self.out.build(shape)

    def affine_matrix(self, affine_units):
        """``(batch, 6)`` units -> ``(batch, 2, 3)`` matrices near the identity."""
        delta = self.affine_scale * ops.tanh(affine_units)
        ident = ops.convert_to_tensor(np.array([1, 0, 0, 0, 1, 0]), dtype=self.compute_dtype)
        return ops.reshape(ident + delta, (-1, 2, 3))

    def call(self, z, normalize: bool = False):
        content, affine_units = z[:, :-6], z[:, -6:]
        grid = ops.convert_to_tensor(self.grid, dtype=self.compute_dtype)  # (P, 3)
        if normalize:
            coords = ops.expand_dims(grid[:, :2], 0)  # (1, P, 2): identity transform
        else:
            mat = self.affine_matrix(affine_units)  # (B, 2, 3)
            coords = ops.einsum("pk,bjk->bpj", grid, mat)  # (B, P, 2)
        # The first layer is split so the content projection is computed once per image.
        h = ops.matmul(coords, self.coord_kernel)
        h = h + ops.expand_dims(ops.matmul(content, self.content_kernel) + self.first_bias, 1)
        h = ops.relu(h)
        for layer in self.hidden:
            h = layer(h)
        return ops.reshape(self.out(h), (-1, self.height, self.width, self.channels))

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width,
                "channels": self.channels,
                "units": self.units, "depth": self.depth, "affine_scale": self.affine_scale}
