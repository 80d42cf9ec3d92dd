"""The transforms of attribute restoration (ARNet) and of transformation prediction (GEOM).

Attribute restoration (``transforms``): an autoencoder learns to undo them.

With ``transforms="rot4"`` the autoencoder is trained to restore the upright image from each of
its four 90-degree rotations; ``"flip4"`` uses the identity, the left-right and up-down flips and
both (it works for any image size, rotations need square images). A normal image's orientation
is something the normal class has and the network learns to restore; an image of another kind
is restored badly from some of its transforms, so the restoration error over all of them
separates anomalies better than the plain reconstruction error (bench/ablation.py).

Transformation prediction (``score="mse+knn+tp"``, in the spirit of GEOM and GOAD): a small
classifier learns which transform was applied to a normal image. Recognizing that a digit is
upside down requires knowing what an upright one looks like, which is what an image of another
kind lacks: its negative log-likelihood of the transforms is high. ``tp_transforms="auto"``
takes ``rot4`` for square images and ``flip4`` otherwise. The eight symmetries of the square
(``d4``, the rotations of the mirror image too) were mixed in a probe outside the project
(seed 0, a separate classifier, added to mse+knn): better on MNIST 2 (0.990 against 0.987)
and the shirt (0.852 against 0.843), worse on the nearly mirror-symmetric 8 (0.950 against
0.964); ``rot4`` stays the default, ``d4`` can be chosen.

Every function takes images ``(batch, H, W, C)``.
"""

from __future__ import annotations

import keras
from keras import ops

from anomaly.errors import ConfigError, expected

#: Name -> number of transforms (the first is always the identity).
TRANSFORMS = {"none": 1, "rot4": 4, "flip4": 4, "d4": 8}


def check_transforms(name: str, image_shape: tuple[int, int, int]) -> None:
    if name not in TRANSFORMS:
        raise expected(f"transforms in {sorted(TRANSFORMS)}", repr(name), cls=ConfigError)
    if name in ("rot4", "d4") and image_shape[0] != image_shape[1]:
        raise expected(f"square images for transforms={name!r} (90-degree rotations)",
                       f"{image_shape[0]}x{image_shape[1]}",
                       hint="Use transforms='flip4' for other shapes.", cls=ConfigError)


def _one(x, name: str, k: int):
    if name == "d4":  # the square's eight symmetries: four rotations, then of the mirror image
        return _one(ops.flip(x, axis=2) if k >= 4 else x, "rot4", k % 4)
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


#: What ``tp_transforms`` accepts: ``auto`` or a transform set with something to predict.
TP_CHOICES = ("auto", *sorted(set(TRANSFORMS) - {"none"}))


def resolve_tp_transforms(name: str, image_shape: tuple[int, int, int]) -> str:
    """``tp_transforms`` for images of ``image_shape``: ``auto`` is ``rot4`` for square images
    and ``flip4`` otherwise; ``none`` is refused (nothing to predict)."""
    if name == "auto":
        return "rot4" if image_shape[0] == image_shape[1] else "flip4"
    if name not in TP_CHOICES:
        raise expected(f"tp_transforms in {list(TP_CHOICES)}", repr(name), cls=ConfigError)
    check_transforms(name, image_shape)
    return name


def labelled_transform(x, name: str, seed):
    """Each image of ``(batch, H, W, C)`` under one transform drawn uniformly at random, and
    the ``(batch,)`` int32 index of the transform it got."""
    count = TRANSFORMS[name]
    pick = keras.random.randint((ops.shape(x)[0],), 0, count, seed=seed)
    if count == 1:
        return x, pick
    stacked = all_transforms(x, name)  # (T, B, H, W, C)
    onehot = ops.one_hot(pick, count, dtype=x.dtype)  # (B, T)
    return ops.einsum("bt,tbhwc->bhwc", onehot, stacked), pick


def stroke_jitter(x, amount: float, seed):
    """Each image of ``(batch, H, W, C)`` in [0, 1] with its strokes (and edges) made thicker
    or thinner by a random amount: blended by ``a ~ U(-amount, amount)``, one ``a`` an image,
    toward its 3x3 grey dilation where ``a > 0`` and its 3x3 grey erosion where ``a < 0``.

    A training augmentation, not a transform to undo or predict: writers and pens differ in
    stroke width, and MNIST's test writers by about 10% in ink from its training writers (SD-3
    thinner, SD-1 thicker, ``bench/calibration_shift.py``). A model that has seen thickness vary
    learns it as normal variation rather than memorizing the training writers' pens. On MNIST 8,
    the hardest digit, ``amount=0.25`` (ink x0.8 to x1.27) gained 0.0044 AUROC, on MNIST 2
    0.0015 (seeds 0-2, side by side); on Fashion-MNIST's pullover and shirt it lost 0.0004 and
    0.0010, so that config turns it off (README "Benchmarks").
    """
    if amount <= 0:
        return x
    a = keras.random.uniform((ops.shape(x)[0], 1, 1, 1), -amount, amount, seed=seed,
                             dtype=x.dtype)
    thick = ops.max_pool(x, 3, strides=1, padding="same")
    thin = -ops.max_pool(-x, 3, strides=1, padding="same")
    return ops.where(a > 0, x + a * (thick - x), x - a * (thin - x))


def random_transform(x, name: str, seed):
    """Each image of ``(batch, H, W, C)`` under one transform drawn uniformly at random."""
    if TRANSFORMS[name] == 1:
        return x
    return labelled_transform(x, name, seed)[0]
