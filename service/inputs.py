"""Request images -> validated float32 pixels ``(N, 28, 28)`` in [0, 1].

Pixel scale is decided **per image** by :func:`anomaly.data.images.to_unit_float`, the one rule
the CLI and the Python API use, so the service scores exactly what ``anomaly score`` scores:

- an image whose values are all integers (JSON numbers written without a decimal point or
  exponent, UINT8 tensors, PNG/JPEG pixels) is read as 0-255 intensities;
- an image with any floating-point value (``0.5``, ``1.0``, FP32 tensors) is read as [0, 1]
  intensities when no value exceeds 1, else as 0-255 intensities.

Deciding per image (not per request) means one image's scale never depends on the other images
sent with it. Before the scale rule, each image is checked here so that every rejection names
its image and reason: shape exactly 28x28 (JSON arrays; encoded PNG/JPEG files of other sizes
are converted to grayscale and resized like ``anomaly score`` does), numbers only, finite, and
within 0..255.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from anomaly.data.images import decode_image_bytes, to_unit_float
from anomaly.errors import DataError
from service.errors import ServiceError, expect

SHAPE = (28, 28)
_DATA_URL = "data:"


def check_batch_size(n: int, max_images: int, *, what: str = "'images'") -> None:
    """422 for an empty batch or one above ``max_images``."""
    if n == 0:
        raise expect(f"at least one image in {what}", "an empty list", code="empty_batch")
    if n > max_images:
        raise expect(f"at most {max_images} images per request (ANOMALY_MAX_BATCH_IMAGES); "
                     "split the batch", f"{n} images", code="batch_too_large")


def check_pixels(a: np.ndarray, what: str) -> None:
    """Reject non-numeric, non-finite and out-of-range pixel arrays, naming ``what``."""
    if a.dtype == bool or a.dtype.kind not in "uif":
        kind = {"U": "strings", "S": "bytes", "O": "null, nested objects or integers beyond "
                "64 bits", "b": "true/false"}.get(a.dtype.kind, f"dtype {a.dtype}")
        raise expect(f"numeric pixel values in {what}", kind, code="invalid_dtype")
    if a.size == 0:
        raise expect(f"{what} with pixels", f"shape {a.shape}", code="invalid_shape")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise expect(f"finite pixel values in {what}", "NaN or Infinity", code="non_finite")
    lo, hi = a.min(), a.max()
    if lo < 0:
        raise expect(f"pixel values >= 0 in {what}", f"minimum {lo:g}", code="out_of_range")
    if hi > 255:
        raise expect(f"pixel values in 0..255 (integers) or [0, 1] (floats) in {what}",
                     f"maximum {hi:g}", code="out_of_range")


def to_unit(a: np.ndarray, what: str) -> np.ndarray:
    """Checked pixels ``(n, 28, 28)`` of one scale -> float32 in [0, 1] (the shared rule)."""
    check_pixels(a, what)
    try:
        return to_unit_float(a, what=what)
    except DataError as exc:  # the checks above should leave nothing for it to reject
        raise ServiceError(422, "invalid_image", str(exc)) from None


def array_image(item: list, index: int) -> np.ndarray:
    """One JSON nested list ``28 x 28`` -> float32 ``(28, 28)`` in [0, 1]."""
    what = f"images[{index}]"
    try:
        a = np.asarray(item)
    except (ValueError, TypeError):
        raise expect(f"{what} as a 28x28 nested list (28 rows of 28 numbers)",
                     "rows of different lengths or nesting", code="invalid_shape") from None
    if a.ndim != 2 or a.shape != SHAPE:
        depth = f"nesting depth {a.ndim}" if a.ndim != 2 else "nesting depth 2"
        raise expect(f"{what} as a 28x28 nested list (28 rows of 28 numbers)",
                     f"{depth}, shape {a.shape}", code="invalid_shape")
    return to_unit(a[None], what)[0]


def encoded_image(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    """PNG/JPEG/... file bytes -> float32 ``(28, 28)`` in [0, 1] (grayscale, resized)."""
    from PIL import Image

    try:  # the header alone: refuse decompression bombs before decoding any pixels
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:
        raise expect(f"{what} to be a PNG, JPEG or other image file", "undecodable bytes "
                     f"({len(data)} bytes)", code="invalid_image") from None
    if width * height > max_pixels:
        raise expect(f"{what} of at most {max_pixels} pixels (ANOMALY_MAX_IMAGE_PIXELS)",
                     f"{width}x{height}", code="image_too_large")
    try:
        gray = decode_image_bytes(data, name=what)
    except DataError as exc:
        raise ServiceError(422, "invalid_image", str(exc)) from None
    return to_unit(gray[None], what)[0]


def base64_image(text: str, index: int, max_pixels: int) -> np.ndarray:
    """A base64 PNG/JPEG string (optionally a ``data:image/...;base64,`` URL) -> pixels."""
    what = f"images[{index}]"
    if text.startswith(_DATA_URL):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        shown = text[:24] + ("..." if len(text) > 24 else "")
        raise expect(f"{what} as a 28x28 nested list or a base64-encoded PNG/JPEG string",
                     f"a string that is not valid base64 ({shown!r})",
                     code="invalid_base64") from None
    return encoded_image(data, what, max_pixels)


def decode_json_images(items: list, *, max_images: int, max_pixels: int) -> np.ndarray:
    """The ``images`` list of a JSON score request -> ``(N, 28, 28)`` float32 in [0, 1]."""
    check_batch_size(len(items), max_images)
    fast = _all_integer_images(items)
    if fast is not None:
        return fast
    out = np.empty((len(items), *SHAPE), np.float32)
    for i, item in enumerate(items):
        if isinstance(item, str):
            out[i] = base64_image(item, i, max_pixels)
        elif isinstance(item, list):
            out[i] = array_image(item, i)
        else:
            raise expect(f"images[{i}] as a 28x28 nested list of numbers or a base64-encoded "
                         "PNG/JPEG string", f"a JSON {_json_type(item)}", code="invalid_image")
    return out


def _all_integer_images(items: list) -> np.ndarray | None:
    """The common case in one vectorized step: every image a valid 28x28 list of 0..255 ints.

    All-integer images are 0-255 each, so converting the batch at once gives exactly the
    per-image result. Anything else returns ``None`` and takes the per-image path, whose
    errors name the image.
    """
    if not all(type(i) is list for i in items):
        return None
    try:
        a = np.asarray(items)
    except (ValueError, TypeError):
        return None
    if a.dtype.kind not in "iu" or a.shape[1:] != SHAPE or a.min() < 0 or a.max() > 255:
        return None
    return to_unit(a, "'images'")


def decode_files(files: list[tuple[str, bytes]], *, max_images: int,
                 max_pixels: int) -> np.ndarray:
    """Uploaded image files ``(filename, bytes)`` -> ``(N, 28, 28)`` float32 in [0, 1]."""
    check_batch_size(len(files), max_images, what="the 'images' file fields")
    out = np.empty((len(files), *SHAPE), np.float32)
    for i, (filename, data) in enumerate(files):
        out[i] = encoded_image(data, f"images[{i}] ({filename})", max_pixels)
    return out


def tensor_images(a: np.ndarray, what: str = "input 'images'") -> np.ndarray:
    """A V2 tensor ``(N, 28, 28)`` or ``(N, 784)`` -> float32 ``(N, 28, 28)`` in [0, 1].

    Each image is scaled on its own (see the module docstring).
    """
    n = a.shape[0]
    flat = a.reshape(n, 28, 28)
    check_pixels(flat, what)
    if a.dtype.kind != "f":
        return to_unit(flat, what)
    # Per-image scale with at most two calls of the shared rule: the images whose maximum is
    # <= 1 are [0, 1] as a group exactly when each is on its own, and likewise the others.
    big = flat.reshape(n, -1).max(axis=1) > 1.0
    if not big.any() or big.all():
        return to_unit(flat, what)
    out = np.empty((n, 28, 28), np.float32)
    out[~big] = to_unit(flat[~big], what)
    out[big] = to_unit(flat[big], what)
    return out


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__
