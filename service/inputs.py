"""Request images -> validated float32 pixels ``(N, H, W)`` in [0, 1], for the model's shape.

Pixel validation and scale are the project's one rule, :func:`anomaly.data.images.to_unit_float`
(the CLI and the Python API use it too), so the service scores exactly what ``anomaly score``
scores; this module only brings each request format to arrays, checks the request-format rules
the validator cannot know (an exact shape for JSON arrays and tensors, batch size, JSON booleans
are not numbers, pixel budgets of encoded images), and maps the validator's
:class:`~anomaly.errors.DataError` to an HTTP error code. The scale rule, decided per image:

- an image whose values are all integers (JSON numbers written without a decimal point or
  exponent, UINT8 tensors, PNG/JPEG pixels) is read as 0-255 intensities;
- an image with any floating-point value (``0.5``, ``1.0``, FP32 tensors) is read as [0, 1]
  intensities when no value exceeds 1, else as 0-255 intensities.

The image shape is the model's (:func:`service.shapes.image_shape`); nothing here assumes 28x28. Everything here
is CPU work: the routes call it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import threading

import numpy as np
import simdjson

from anomaly.data.images import decode_image_bytes, to_unit_float
from anomaly.errors import DataError
from service.errors import ServiceError, expect, json_type
from service.shapes import pixel_shape, shape_text

_DATA_URL = "data:"

#: Validator message -> error code, matched on the "Expected ..." part only (never on the
#: client's data). The validator's own ``code`` attribute wins where it has one.
_DATA_ERROR_CODES = (
    ("finite", "non_finite"), ("0..255", "out_of_range"), (">= 0", "out_of_range"),
    ("numeric", "invalid_dtype"), ("rectangular", "invalid_shape"), ("shape", "invalid_shape"),
    ("height and width", "invalid_shape"), ("at least one image", "empty_batch"),
)


def data_error(exc: DataError) -> ServiceError:
    """The validator's error as a 422 with the code of its reason."""
    message = str(exc)
    code = getattr(exc, "code", None)
    if not code:
        head = message.partition(". Received:")[0]
        code = next((c for key, c in _DATA_ERROR_CODES if key in head), "invalid_image")
    return ServiceError(422, code, message)


def validated(a: np.ndarray, what: str, shape: tuple[int, int, int] | None = None
              ) -> np.ndarray:
    """Pixels ``(n, ...)`` -> float32 in [0, 1] by the shared rule (brought to ``shape`` when
    given); its errors as 422s."""
    if a.dtype == bool:  # JSON true/false: a request-format error, not a 0/255 mask
        raise expect(f"numeric pixel values in {what}", "true/false", code="invalid_dtype")
    try:
        return to_unit_float(a, shape=shape, what=what)
    except DataError as exc:
        raise data_error(exc) from None


def check_batch_size(n: int, max_images: int, *, what: str = "'images'") -> None:
    """422 for an empty batch or one above ``max_images``."""
    if n == 0:
        raise expect(f"at least one image in {what}", "an empty list", code="empty_batch")
    if n > max_images:
        raise expect(f"at most {max_images} images per request (ANOMALY_MAX_BATCH_IMAGES); "
                     "split the batch", f"{n} images", code="batch_too_large")


class PixelBudget:
    """The decoded-pixel allowance of one request's PNG/JPEG images, spent from their headers
    before any of them is decoded (a few small files can expand to gigabytes)."""

    def __init__(self, per_image: int, per_request: int):
        self.per_image = per_image
        self.per_request = per_request
        self.spent = 0

    def spend(self, width: int, height: int, what: str) -> None:
        pixels = width * height
        if pixels > self.per_image:
            raise expect(f"{what} of at most {self.per_image} pixels (ANOMALY_MAX_IMAGE_PIXELS)",
                         f"{width}x{height}", code="image_too_large")
        self.spent += pixels
        if self.spent > self.per_request:
            raise expect(f"at most {self.per_request} decoded pixels per request "
                         "(ANOMALY_MAX_REQUEST_PIXELS); split the batch",
                         f"{self.spent} pixels up to {what}", code="too_many_pixels")


def array_image(item: list, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """One JSON nested list of the model's image shape -> float32 in [0, 1]."""
    what = f"images[{index}]"
    want = pixel_shape(shape)
    form = f"{what} as a {shape_text(want)} nested list ({want[0]} rows of {want[1]} numbers)"
    try:
        a = np.asarray(item)
    except (ValueError, TypeError):
        raise expect(form, "rows of different lengths or nesting", code="invalid_shape") from None
    if a.shape != want:
        raise expect(form, f"nesting depth {a.ndim}, shape {a.shape}", code="invalid_shape")
    return validated(a[None], what)[0]


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """``(width, height)`` of an encoded image from its header alone, decoding no pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        raise expect(f"{what} to be a PNG, JPEG or other image file", "undecodable bytes "
                     f"({len(data)} bytes)", code="invalid_image") from None


def encoded_image(data: bytes, what: str, shape: tuple[int, int, int]) -> np.ndarray:
    """PNG/JPEG/... file bytes -> float32 of the model's shape (its channels; other sizes
    resized, with a note in the log).

    Call :meth:`PixelBudget.spend` with :func:`image_size` first: decoding is the expensive
    part and a small file can hold a huge image.
    """
    try:
        gray = decode_image_bytes(data, name=what, channels=shape[2])
    except DataError as exc:
        raise ServiceError(422, "invalid_image", str(exc)) from None
    out = validated(gray[None], what, shape)[0]
    if out.shape != pixel_shape(shape):
        raise expect(f"{what} convertible to the model's {shape_text(pixel_shape(shape))} "
                     f"images", f"{gray.shape[1]}x{gray.shape[0]} pixels giving {out.shape}",
                     code="invalid_image")
    return out


def base64_bytes(text: str, index: int) -> bytes:
    """A base64 PNG/JPEG string (optionally a ``data:image/...;base64,`` URL) -> file bytes."""
    if text.startswith(_DATA_URL):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        shown = text[:24] + ("..." if len(text) > 24 else "")
        raise expect(f"images[{index}] as a nested list or a base64-encoded PNG/JPEG string",
                     f"a string that is not valid base64 ({shown!r})",
                     code="invalid_base64") from None


def _decode_encoded(encoded: dict[int, tuple[str, bytes]], out: np.ndarray,
                    shape: tuple[int, int, int], budget: PixelBudget) -> None:
    """Decode ``{index: (what, bytes)}`` into ``out[index]``: every header is read and the
    whole request's pixels are counted before the first image is decoded."""
    for what, data in encoded.values():
        budget.spend(*image_size(data, what), what)
    for i, (what, data) in encoded.items():
        out[i] = encoded_image(data, what, shape)


def decode_json_images(items: list, *, shape: tuple[int, int, int], max_images: int,
                       max_pixels: int, max_request_pixels: int) -> np.ndarray:
    """The ``images`` list of a JSON score request -> ``(N, *pixel_shape)`` float32 in [0, 1].

    Args:
        items: each a nested list of the model's image shape or a base64 PNG/JPEG string.
        shape: the model's ``(H, W, C)``.
        max_pixels, max_request_pixels: encoded images' pixel caps, per image and in all.
    """
    check_batch_size(len(items), max_images)
    fast = _all_integer_images(items, shape)
    if fast is not None:
        return fast
    out = np.empty((len(items), *pixel_shape(shape)), np.float32)
    encoded: dict[int, tuple[str, bytes]] = {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            encoded[i] = (f"images[{i}]", base64_bytes(item, i))
        elif isinstance(item, list):
            out[i] = array_image(item, i, shape)
        else:
            raise expect(f"images[{i}] as a nested list of numbers or a base64-encoded "
                         "PNG/JPEG string", f"a JSON {json_type(item)}", code="invalid_image")
    _decode_encoded(encoded, out, shape, PixelBudget(max_pixels, max_request_pixels))
    return out


def _all_integer_images(items: list, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The common case in one vectorized step: every image a valid list of 0..255 ints.

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
    if a.dtype.kind not in "iu" or a.shape[1:] != pixel_shape(shape) or a.min() < 0 or (
            a.max() > 255):
        return None
    return validated(a, "'images'")


_WHITESPACE = b" \t\n\r"
_IMAGES_KEY = b'"images"'
_parsers = threading.local()
#: Spans up to this size reuse their thread's parser (a 256-image 28x28 batch is about 0.7 MB);
#: a larger one gets a parser of its own, freed with it, since a parser keeps the buffers of the
#: largest document it has read: about 13x its bytes (52 MB after a 4 MiB span, measured).
_REUSE_PARSER_BYTES = 1 << 20
#: Most bytes a number of an accepted span may take with its whitespace: json.dumps(indent=2)
#: of a colour batch takes 13. A span padded beyond that is left to the general path rather
#: than parsed into buffers sized by its bytes.
_MAX_BYTES_PER_NUMBER = 32


def _json_parser(size: int) -> simdjson.Parser:
    """A simdjson parser for a document of ``size`` bytes: for small ones this thread's own
    (one parser reads one document at a time, and the routes read bodies on several CPU-pool
    threads at once)."""
    if size > _REUSE_PARSER_BYTES:
        return simdjson.Parser()
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    return parser


@functools.lru_cache(maxsize=16)
def _punctuation(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a JSON nested list of ``shape``, numbers left out:
    ``(2, 2)`` -> ``b"[[,],[,]]"``. Cached per image shape (one per model), not per batch."""
    inner = b""
    for size in reversed(shape):
        inner = b"[" + b",".join([inner] * size) + b"]"
    return inner


def integer_json_batch(body: bytes, shape: tuple[int, int, int], *, max_images: int,
                       max_depth: int) -> tuple[np.ndarray, bytes] | None:
    """The common large JSON request read from its bytes, without building a Python list.

    A body ``{..., "images": [...], ...}`` whose ``images`` are nested lists of the model's
    shape holding only integers 0..255 gives ``(uint8 images (N, *pixel_shape), the body with
    the images replaced by [])``; the caller parses and validates the rest as usual. Anything
    else (floats, base64 strings, other shapes, a key that may not be the top-level one,
    escapes anywhere in the body, invalid JSON in the span, too many images) gives ``None``:
    the general path then parses the whole body and its errors name what is wrong, so every
    body gets the response it got before, only sooner. The span is found with ``find`` and
    read by simdjson (pysimdjson) into one int64 buffer, the nesting checked by one
    ``bytes.translate``: a 64-image MNIST body (175 kB) takes 0.59 ms this way, against 0.82 ms
    for the hand-written numpy byte scanner it replaced and 2.2 ms for the whole body parsed
    (orjson's lists, then ``np.asarray`` of them; bench/json_reader_bench.py, one run).
    """
    key = body.find(_IMAGES_KEY)
    # One occurrence, no escapes, and only the body's own opening brace before it: then it is
    # the top-level key (a nested object or a string holding a brace would add a brace).
    if key < 0 or body.find(_IMAGES_KEY, key + 1) >= 0 or b"\\" in body:
        return None
    head = body[:key]
    if (head.lstrip()[:1] != b"{" or head.count(b"{") != 1
            or any(c in head for c in (b"}", b"[", b"]"))):
        return None
    colon = body.find(b":", key + len(_IMAGES_KEY))
    if colon < 0 or body[key + len(_IMAGES_KEY):colon].strip():
        return None
    start = colon + 1
    while start < len(body) and body[start] in _WHITESPACE:
        start += 1
    pixels = pixel_shape(shape)
    if body[start:start + 1] != b"[" or 2 + len(pixels) > max_depth:
        return None
    # In valid JSON the array is followed by whitespace, then a comma and the next key's
    # quote, or the closing brace: it ends at the last bracket before the first of those. A
    # span that ends anywhere else fails the structure checks below.
    after = [i for i in (body.find(b'"', start), body.find(b"}", start)) if i >= 0]
    end = body.rfind(b"]", start, min(after, default=len(body))) + 1
    if end == 0:
        return None
    span = body[start:end]
    # A span longer than the largest batch can be is refused before buffers sized by its bytes
    # are built (O(1); counting its commas would cost a quarter of the parse).
    per_image = math.prod(pixels)
    if len(span) > _MAX_BYTES_PER_NUMBER * max_images * per_image:
        return None
    try:
        # simdjson validates the span as JSON (no leading zeros, no split numbers, one value)
        # and copies its integers, flattened, into one buffer; a float or an integer beyond
        # int64 raises. (No proxy of the parsed document outlives this line, so a parser is
        # never refused for reuse.)
        flat = np.frombuffer(_json_parser(len(span)).parse(span).as_buffer(of_type="i"),
                             np.int64)
    except (TypeError, ValueError, RuntimeError):
        return None
    n, extra = divmod(len(flat), per_image)
    if extra or not 0 < n <= max_images:
        return None
    # The buffer is flat, ragged lists included: the brackets and commas in order (numbers
    # and whitespace left out) fix the exact nesting (n, *pixels); a minus sign fails here.
    if span.translate(None, _WHITESPACE + b"0123456789") != (
            b"[" + b",".join([_punctuation(pixels)] * n) + b"]"):
        return None
    if flat.max() > 255:
        return None
    rest = body[:start] + b"[]" + body[end:]
    return flat.astype(np.uint8).reshape(n, *pixels), rest


def decode_files(files: list[tuple[str, bytes]], *, shape: tuple[int, int, int],
                 max_images: int, max_pixels: int, max_request_pixels: int) -> np.ndarray:
    """Uploaded image files ``(filename, bytes)`` -> ``(N, *pixel_shape)`` float32 in [0, 1]."""
    check_batch_size(len(files), max_images, what="the 'images' file fields")
    out = np.empty((len(files), *pixel_shape(shape)), np.float32)
    encoded = {i: (f"images[{i}] ({filename[:64]})", data)
               for i, (filename, data) in enumerate(files)}
    _decode_encoded(encoded, out, shape, PixelBudget(max_pixels, max_request_pixels))
    return out


def tensor_images(a: np.ndarray, shape: tuple[int, int, int],
                  what: str = "input 'images'") -> np.ndarray:
    """A V2 tensor of one of :func:`tensor_shapes` -> float32 ``(N, *pixel_shape)`` in [0, 1].

    Each image is scaled on its own, by the shared rule.
    """
    return validated(a.reshape(a.shape[0], *pixel_shape(shape)), what)
