"""The image shape of a model, read in one place (no HTTP here: the registry uses it too)."""

from __future__ import annotations

import math


def image_shape(detector) -> tuple[int, int, int]:
    """The ``(height, width, channels)`` of the images ``detector`` scores: the one place the
    service reads it."""
    return tuple(int(v) for v in detector.image_shape_)


def pixel_shape(shape: tuple[int, int, int]) -> tuple[int, ...]:
    """One image's array shape for a model shape: ``(H, W)`` for grayscale, else ``(H, W, C)``."""
    h, w, c = shape
    return (h, w) if c == 1 else (h, w, c)


def shape_text(shape: tuple[int, ...]) -> str:
    """``(32, 48)`` -> ``"32x48"``."""
    return "x".join(map(str, shape))


def tensor_shapes(shape: tuple[int, int, int]) -> list[list[int]]:
    """The V2 input shapes accepted for a model shape (``-1`` = any batch size): the images
    as they are, and flattened."""
    return [[-1, *pixel_shape(shape)], [-1, math.prod(shape)]]
