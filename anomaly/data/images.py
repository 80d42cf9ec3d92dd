"""Users' own images: arrays, folders of PNG/JPEG files and CSV pixel rows, checked and scaled.

Every model works on grayscale 28x28 images with float32 values in [0, 1]. Inputs are brought
there by one set of rules, the same for the CLI, the Python API and the service:

- Scale: integer values are 0-255 pixel intensities. Floating-point values are intensities in
  [0, 1] in an image none of whose values exceeds 1, else 0-255 (decided image by image).
  Anything outside, NaN or Inf is rejected.
- Shape: ``(N, 28, 28)``, ``(N, 784)`` and ``(N, 28, 28, 1)`` are taken as they are. Other
  sizes ``(N, H, W)`` (and colour ``(N, H, W, 3|4)``, converted with ITU-R 601 luma) are
  resized to 28x28 with Pillow's Lanczos filter, with a note on stderr: the models were trained
  on 28x28 images, so the resized image is what is scored.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.errors import DataError, expected

_log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_LABEL_COLUMNS = ("label", "labels", "y", "class", "target")


@dataclass
class ImageSet:
    """Images read from a user's file or folder.

    Attributes:
        images: float32 array in [0, 1], shape ``(N, 28, 28)``.
        ids: one identifier per image (file name, or row index as a string), shape ``(N,)``.
        labels: class label per image or ``None``; shape ``(N,)``.
        class_names: names of the label values where known (folder names), else ``None``.
    """

    images: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None


def to_unit_float(arr, *, what: str = "images") -> np.ndarray:
    """Validate pixel data and return float32 images in [0, 1] of shape ``(N, 28, 28)``.

    Args:
        arr: array-like of shape ``(N, 28, 28)``, ``(N, 784)``, ``(N, 28, 28, 1)``,
            ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3, 4}; integers in 0..255 or
            floats in [0, 1] (or in 0..255 when some value exceeds 1).
        what: how to name the data in error messages.

    Returns:
        float32 array of shape ``(N, 28, 28)`` with values in [0, 1].
    """
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError) as exc:
        raise expected(f"{what} as a rectangular numeric array", f"ragged or mixed data ({exc})",
                       cls=DataError) from None
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind not in "uif":
        raise expected(f"{what} with numeric pixel values", f"dtype {a.dtype}", cls=DataError)
    if a.ndim == 0 or a.shape[0] == 0:
        raise expected(f"at least one image in {what}", f"shape {a.shape}", cls=DataError)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).reshape(a.shape[0], -1).any(axis=1).argmax())
        raise expected(f"finite pixel values in {what}", f"NaN or Inf in image {bad}",
                       cls=DataError)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0:
        raise expected(f"pixel values >= 0 in {what}", f"minimum {lo:g}", cls=DataError)
    if hi > 255:
        raise expected(f"pixel values in 0..255 (or [0, 1] as floats) in {what}",
                       f"maximum {hi:g}", cls=DataError)
    if a.dtype.kind != "f":
        unit = a.astype(np.float32) / np.float32(255.0)
    elif hi <= 1.0:
        unit = a.astype(np.float32, copy=False)
    else:
        # Decided image by image, as the service decides for each image of a request, so a
        # dark 0-255 image in a batch of bright ones is scaled like the others.
        per_image = a.reshape(a.shape[0], -1).max(axis=1) > 1.0
        scale = np.where(per_image, np.float32(255.0), np.float32(1.0)).astype(np.float32)
        unit = a.astype(np.float32) / scale.reshape((-1,) + (1,) * (a.ndim - 1))
    return _to_28x28(unit, what)


def _to_28x28(a: np.ndarray, what: str) -> np.ndarray:
    n = a.shape[0]
    if a.ndim == 2 and a.shape[1] == 784:
        return a.reshape(n, 28, 28)
    if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        if a.shape[-1] == 1:
            a = a[..., 0]
        else:
            a = a[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.ndim != 3:
        raise expected(f"{what} of shape (N, 28, 28), (N, 784), (N, 28, 28, 1) or (N, H, W[, C])",
                       f"shape {a.shape}", cls=DataError)
    if a.shape[1:] == IMAGE_SHAPE:
        return np.ascontiguousarray(a, dtype=np.float32)
    if min(a.shape[1:]) < 1:
        raise expected(f"{what} with a non-empty height and width", f"shape {a.shape}",
                       cls=DataError)
    # A note, not a warning: resizing is documented behaviour. The CLI shows it; a server logs it.
    _log.info("resizing %d image(s) of %dx%d to 28x28 (Lanczos)", n, a.shape[1], a.shape[2])
    return np.stack([_resize(img) for img in a])


def _resize(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(img.astype(np.float32), mode="F")
    out = np.asarray(pil.resize(IMAGE_SHAPE[::-1], Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def decode_image_bytes(data: bytes, *, name: str = "image") -> np.ndarray:
    """Decode one PNG/JPEG/... file's bytes to a uint8 grayscale array of shape ``(H, W)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Transparent pixels are background: composite onto black, like MNIST's ground.
                rgba = img.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, rgba)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise expected(f"{name} to be a PNG, JPEG or other image file",
                       f"undecodable bytes ({exc.__class__.__name__})", cls=DataError) from None


def _stack_gray(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """Stack uint8 images of possibly different sizes into ``(N, 28, 28)`` floats."""
    if len({img.shape for img in images}) == 1:
        return to_unit_float(np.stack(images), what="the images")
    return np.concatenate([to_unit_float(img[None], what=name) for img, name in
                           zip(images, names, strict=True)])


def _load_folder(path: Path) -> ImageSet:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise expected(f"image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {path}",
                       "none", cls=DataError)
    ids = [str(p.relative_to(path)) for p in files]
    images = [decode_image_bytes(p.read_bytes(), name=str(p)) for p in files]
    subdirs = [p.parent.relative_to(path).parts for p in files]
    labels = class_names = None
    # One level of sub-folders names the classes (e.g. normal/ and anomaly/, or 0/ .. 9/).
    if all(len(parts) == 1 for parts in subdirs):
        names = sorted({parts[0] for parts in subdirs})
        class_names = tuple(names)
        labels = np.array([names.index(parts[0]) for parts in subdirs], dtype=np.int64)
    return ImageSet(_stack_gray(images, ids), ids, labels, class_names)


def _load_csv(path: Path) -> ImageSet:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise expected("a CSV file of pixel rows with a header line", f"{path} ({exc})",
                       cls=DataError) from None
    label_col = next((c for c in df.columns if str(c).lower() in _LABEL_COLUMNS), None)
    id_col = next((c for c in df.columns if str(c).lower() in ("id", "file", "filename", "name")),
                  None)
    pixel_cols = [c for c in df.columns if c not in (label_col, id_col)]
    if len(pixel_cols) != 784:
        raise expected("a CSV with 784 pixel columns (plus optional 'label' and 'id' columns)",
                       f"{len(pixel_cols)} pixel columns in {path}", cls=DataError)
    pixels = df[pixel_cols]
    non_numeric = [c for c in pixel_cols if not pd.api.types.is_numeric_dtype(pixels[c])]
    if non_numeric:
        raise expected("numeric pixel values in every pixel column",
                       f"non-numeric values in column {non_numeric[0]!r} of {path}",
                       cls=DataError)
    images = to_unit_float(pixels.to_numpy(), what=f"the pixel rows of {path}")
    ids = df[id_col].astype(str).tolist() if id_col is not None else [str(i) for i in df.index]
    labels = None
    if label_col is not None:
        labels = _int_labels(df[label_col].to_numpy(), path)
    return ImageSet(images, ids, labels)


def _int_labels(y: np.ndarray, path: Path) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise expected("integer class labels", f"dtype {y.dtype} in {path}", cls=DataError)
    return y.astype(np.int64)


def _load_array(path: Path) -> ImageSet:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = ("pickled objects, which are refused" if "allow_pickle" in str(exc)
                  else "not a NumPy array file")
        raise expected("a .npy/.npz file of numeric arrays", f"{path} ({reason})",
                       cls=DataError) from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("x", "images", "x_test", "x_train", "arr_0") if k in keys),
                       None)
            if key is None:
                raise expected("an .npz with an array named 'x' or 'images'",
                               f"arrays {keys} in {path}", cls=DataError)
            arr = loaded[key]
            ykey = next((k for k in ("y", "labels", "y_test", "y_train") if k in keys), None)
            if ykey is not None:
                labels = _int_labels(loaded[ykey], path)
    else:
        arr = loaded
    images = to_unit_float(arr, what=f"the array in {path}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise expected(f"one label per image ({images.shape[0]})", f"shape {labels.shape}",
                       cls=DataError)
    return ImageSet(images, [str(i) for i in range(images.shape[0])], labels)


def load_images(path: str | Path) -> ImageSet:
    """Read images from a ``.npy``/``.npz`` array, a ``.csv`` of pixel rows, an image file or a
    folder of image files (sub-folders name classes).

    Returns:
        An :class:`ImageSet` whose ``images`` have shape ``(N, 28, 28)``, float32 in [0, 1].
    """
    path = Path(path)
    if not path.exists():
        raise expected("an existing file or folder of images", f"{path} (not found)",
                       cls=DataError)
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _load_array(path)
    if suffix == ".csv":
        return _load_csv(path)
    if suffix in IMAGE_SUFFIXES:
        img = decode_image_bytes(path.read_bytes(), name=str(path))
        return ImageSet(to_unit_float(img[None], what=str(path)), [path.name])
    raise expected("a .npy, .npz, .csv, image file or a folder of images",
                   f"{path} (unknown suffix {suffix!r})", cls=DataError)
