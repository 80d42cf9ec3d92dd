"""Attribute restoration (in the spirit of ARNet): the transforms an autoencoder learns to undo.

With ``transforms="rot4"`` the autoencoder is trained to restore the upright image from each of
its four 90-degree rotations; ``"flip4"`` uses the identity, the left-right and up-down flips and
both (it works for any image size, rotations need square images). A normal image's orientation
is something the normal class has and the network learns to restore; an image of another kind
is restored badly from some of its transforms, so the restoration error over all of them
separates anomalies better than the plain reconstruction error (bench/ablation.py).

Every function takes images ``(batch, H, W, C)``.
"""

from __future__ import annotations

import keras
from keras import ops

from anomaly.errors import ConfigError, expected

#: Name -> number of transforms (the first is always the identity).
TRANSFORMS = {"none": 1, "rot4": 4, "flip4": 4}


def check_transforms(name: str, image_shape: tuple[int, int, int]) -> None:
    if name not in TRANSFORMS:
        raise expected(f"transforms in {sorted(TRANSFORMS)}", repr(name), cls=ConfigError)
    if name == "rot4" and image_shape[0] != image_shape[1]:
        raise expected("square images for transforms='rot4' (90-degree rotations)",
                       f"{image_shape[0]}x{image_shape[1]}",
                       hint="Use transforms='flip4' for other shapes.", cls=ConfigError)


def _one(x, name: str, k: int):
    if name == "rot4":
        # rot90 on (H, W) axes: transpose then flip, k times.
        for _ in range(k):
            x = ops.flip(ops.transpose(x, (0, 2, 1, 3)), axis=1)
        return x
    if k & 1:
        x = ops.flip(x, axis=2)
    if k & 2:
        x = ops.flip(x, axis=1)
    return x


def all_transforms(x, name: str):
    """``(T, batch, H, W, C)``: every transform of every image (T = ``TRANSFORMS[name]``)."""
    return ops.stack([_one(x, name, k) for k in range(TRANSFORMS[name])], axis=0)


def random_transform(x, name: str, seed):
    """Each image of ``(batch, H, W, C)`` under one transform drawn uniformly at random."""
    count = TRANSFORMS[name]
    if count == 1:
        return x
    stacked = all_transforms(x, name)  # (T, B, H, W, C)
    pick = keras.random.randint((ops.shape(x)[0],), 0, count, seed=seed)
    onehot = ops.one_hot(pick, count, dtype=x.dtype)  # (B, T)
    return ops.einsum("bt,tbhwc->bhwc", onehot, stacked)
