"""Users' own images: arrays, folders of PNG/JPEG files and CSV pixel rows, checked and scaled.

Images are ``(N, H, W)`` arrays (grayscale) or ``(N, H, W, 3)`` (colour), float32 in [0, 1]:
the channel axis is there only for colour. A model's image shape is ``(H, W, C)``. Inputs are
brought to it by one set of rules, the same for the CLI, the Python API and the service
(:func:`to_unit_float`, the one pixel validator):

- Scale: integer values are 0-255 pixel intensities. Floating-point values are intensities in
  [0, 1] in an image none of whose values exceeds 1, else 0-255 (decided image by image).
  Anything outside, NaN or Inf is rejected.
- Shape: ``(N, H, W)``, ``(N, H*W*C)`` (flattened rows) and ``(N, H, W, C)`` with C in 1, 3, 4
  (an alpha channel is dropped). Given a target shape, colour is converted to grey with ITU-R
  601 luma (grey to colour by repeating it) and other sizes are resized with Pillow's Lanczos
  filter, with a note: the resized image is what is scored. Without a target the images keep
  their own size, and flattened rows must be square.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly.errors import DataError, expected

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_LABEL_COLUMNS = ("label", "labels", "y", "class", "target")


@dataclass
class ImageSet:
    """Images read from a user's file or folder.

    Attributes:
        images: float32 array in [0, 1], ``(N, H, W)`` or ``(N, H, W, 3)``.
        ids: one identifier per image (file name, or row index as a string), shape ``(N,)``.
        labels: class label per image or ``None``; shape ``(N,)``.
        class_names: names of the label values where known (folder names), else ``None``.
        skipped: ``(id, reason)`` of the files left out by ``skip_bad`` (empty otherwise).
    """

    images: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def to_unit_float(arr, *, shape: tuple[int, int, int] | None = None,
                  what: str = "images") -> np.ndarray:
    """Validate pixel data and return float32 images in [0, 1].

    Args:
        arr: array-like of shape ``(N, H, W)``, ``(N, H*W*C)`` or ``(N, H, W, C)`` with C in
            {1, 3, 4}; integers in 0..255 or floats in [0, 1] (or in 0..255 when some value of
            the image exceeds 1).
        shape: the target image shape ``(H, W, C)`` (a model's); ``None`` keeps the images'
            own size and channels.
        what: how to name the data in error messages.

    Returns:
        float32 array ``(N, H, W)`` (C = 1) or ``(N, H, W, 3)`` with values in [0, 1].
    """
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError, RecursionError) as exc:
        raise expected(f"{what} as a rectangular numeric array",
                       f"ragged or mixed data ({type(exc).__name__})", cls=DataError) from None
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
    if a.dtype == np.uint8:
        # In range by its type: the two reductions are skipped and the scaling is one pass,
        # the same float32 arithmetic as below (each numpy pass in the service's CPU threads
        # may wait for the GIL again; issue #12's profile of the v1 JSON batch path).
        return _to_shape(np.divide(a, np.float32(255.0), dtype=np.float32), shape, what)
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
    return _to_shape(unit, shape, what)


def image_shape_of(images: np.ndarray) -> tuple[int, int, int]:
    """``(H, W, C)`` of images ``(N, H, W)`` or ``(N, H, W, C)``."""
    if images.ndim == 3:
        return (int(images.shape[1]), int(images.shape[2]), 1)
    return (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))


def with_channels(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, H, W, 1)``; colour ``(N, H, W, C)`` unchanged (what networks take)."""
    return images[..., None] if images.ndim == 3 else images


def without_channels(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 1)`` -> ``(N, H, W)``; colour unchanged (the public image convention)."""
    return images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images


def _shape_text(shape) -> str:
    h, w, c = shape
    return f"(N, {h}, {w})" if c == 1 else f"(N, {h}, {w}, {c})"


def _to_shape(a: np.ndarray, shape, what: str) -> np.ndarray:
    n = a.shape[0]
    if a.ndim == 2:
        side = round(np.sqrt(a.shape[1])) if shape is None else None
        if shape is not None and a.shape[1] == shape[0] * shape[1] * shape[2]:
            a = a.reshape(n, *shape)
        elif shape is None and side * side == a.shape[1] and side > 0:
            a = a.reshape(n, side, side)
        else:
            want = (f"{shape[0] * shape[1] * shape[2]} values per row" if shape is not None
                    else "a square number of values per row")
            raise expected(f"{what} as flattened rows of {want}", f"shape {a.shape}",
                           cls=DataError)
    if a.ndim == 4 and a.shape[-1] not in (1, 3, 4):
        raise expected(f"{what} with 1, 3 or 4 channels (grey, RGB, RGBA)",
                       f"shape {a.shape}", cls=DataError)
    if a.ndim == 4:
        if a.shape[-1] == 4:
            a = a[..., :3]
        if a.shape[-1] == 1:
            a = a[..., 0]
    if a.ndim not in (3, 4):
        want = _shape_text(shape) if shape is not None else "(N, H, W) or (N, H, W, 3)"
        raise expected(f"{what} of shape {want} (or flattened rows, or with a channel axis)",
                       f"shape {a.shape}", cls=DataError)
    if min(a.shape[1:3]) < 1:
        raise expected(f"{what} with a non-empty height and width", f"shape {a.shape}",
                       cls=DataError)
    if shape is None:
        return np.ascontiguousarray(a, dtype=np.float32)
    h, w, c = shape
    if c == 1 and a.ndim == 4:
        a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif c == 3 and a.ndim == 3:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.shape[1:3] != (h, w):
        # A note, not a warning: resizing is documented behaviour. The CLI shows it; a server
        # logs it.
        _log.info("resizing %d image(s) of %dx%d to %dx%d (Lanczos)", n, a.shape[1], a.shape[2],
                  h, w)
        a = np.stack([_resize(img, (h, w)) for img in a])
    return np.ascontiguousarray(a, dtype=np.float32)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if img.ndim == 3:  # Pillow's float mode is single-channel: resize channel by channel
        return np.stack([_resize(img[..., k], size) for k in range(img.shape[-1])], axis=-1)
    pil = Image.fromarray(img.astype(np.float32), mode="F")
    out = np.asarray(pil.resize(size[::-1], Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


def decode_image_bytes(data: bytes, *, name: str = "image", channels: int | None = 1
                       ) -> np.ndarray:
    """Decode one PNG/JPEG/... file's bytes to uint8 pixels.

    Args:
        channels: 1 for grayscale ``(H, W)``, 3 for colour ``(H, W, 3)``, ``None`` for the
            file's own (colour modes give 3, the others 1).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if channels is None:
                # A colour file whose pixels are all grey (a common way to save grey images)
                # is grey.
                colour = img.mode in _COLOUR_MODES
                if colour:
                    rgb = np.asarray(img.convert("RGB"))
                    colour = not (np.array_equal(rgb[..., 0], rgb[..., 1])
                                  and np.array_equal(rgb[..., 1], rgb[..., 2]))
                channels = 3 if colour else 1
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Transparent pixels are background: composite onto black, like MNIST's ground.
                rgba = img.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, rgba)
            return np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise expected(f"{name} to be a PNG, JPEG or other image file",
                       f"undecodable bytes ({exc.__class__.__name__})", cls=DataError) from None


def check_one_size(sizes: set[tuple[int, int]]) -> None:
    """Refuse training images of several sizes ``(H, W)``, naming them and ``--image-size``."""
    if len(sizes) > 1:
        shown = sorted(sizes)
        text = ", ".join(f"{h}x{w}" for h, w in shown[:5]) + (" ..." if len(shown) > 5 else "")
        raise expected("images of one size (HxW) to train on", f"sizes {text}",
                       hint="Pass --image-size HxW to resize them to one size.", cls=DataError)


def stack_images(images: list[np.ndarray], names: list[str], *,
                 shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Stack decoded images ``(H, W)``/``(H, W, 3)`` into one float array (see
    :func:`to_unit_float`): brought to ``shape`` when given, else they must share one size
    (colour wins over grey)."""
    if shape is None:
        check_one_size({img.shape[:2] for img in images})
        if any(img.ndim == 3 for img in images):
            images = [img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
                      for img in images]
        return to_unit_float(np.stack(images), what="the images")
    if len({img.shape for img in images}) == 1:
        return to_unit_float(np.stack(images), shape=shape, what="the images")
    return np.concatenate([to_unit_float(img[None], shape=shape, what=name)
                           for img, name in zip(images, names, strict=True)])


def list_files(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """A folder's files (sub-folders included) with one of ``suffixes``, sorted; hidden files
    and folders (a leading dot) are left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(s.startswith(".") for s in p.relative_to(folder).parts))


def decode_files(root: Path, files: list[Path], channels: int | None, *, skip_bad: bool,
                 skipped: list[tuple[str, str]], desc: str
                 ) -> Iterator[tuple[Path, np.ndarray]]:
    """Decode image files one by one, with progress: ``(file, pixels)`` (see
    :func:`decode_image_bytes` for ``channels``).

    ``skip_bad``: a file that cannot be read or decoded is left out and appended to ``skipped``
    as ``(path relative to root, reason)`` instead of failing the whole folder.
    """
    from anomaly.progress import progress

    with progress(desc, total=len(files), unit="files") as bar:
        for p in files:
            try:
                img = decode_image_bytes(p.read_bytes(), name=str(p), channels=channels)
            except (DataError, OSError) as exc:
                if not skip_bad:
                    raise
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                skipped.append((str(p.relative_to(root)), reason))
            else:
                yield p, img
            finally:
                bar.update()


def folder_labels(root: Path, files: list[Path]
                  ) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Class labels ``(N,)`` and names of a folder's files when one level of sub-folders
    names the classes (e.g. normal/ and anomaly/, or 0/ .. 9/), else ``(None, None)``."""
    subdirs = [p.parent.relative_to(root).parts for p in files]
    if not all(len(parts) == 1 for parts in subdirs):
        return None, None
    names = sorted({parts[0] for parts in subdirs})
    return (np.array([names.index(parts[0]) for parts in subdirs], dtype=np.int64),
            tuple(names))


def no_images_in(path: Path) -> DataError:
    """The error of a folder without image files (the in-memory and streaming readers')."""
    return expected(f"image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {path}",
                    "none", cls=DataError)


def all_skipped(path: Path, n_skipped: int) -> DataError:
    """The error of a folder whose ``n_skipped`` files were all skipped as bad."""
    return expected(f"at least one readable image file in the folder {path}",
                    f"{n_skipped} files, all skipped as bad", cls=DataError)


def _load_folder(path: Path, shape, *, skip_bad: bool = False) -> ImageSet:
    """A folder's image files (sub-folders name classes); ``skip_bad``: see
    :func:`decode_files`."""
    files = list_files(path)
    if not files:
        raise no_images_in(path)
    channels = None if shape is None else shape[2]
    kept, images, skipped = [], [], []
    for p, img in decode_files(path, files, channels, skip_bad=skip_bad, skipped=skipped,
                               desc=f"Reading {path}"):
        kept.append(p)
        images.append(img)
    if not kept:
        raise all_skipped(path, len(skipped))
    ids = [str(p.relative_to(path)) for p in kept]
    labels, class_names = folder_labels(path, kept)
    return ImageSet(stack_images(images, ids, shape=shape), ids, labels, class_names, skipped)


def _load_csv(path: Path, shape) -> ImageSet:
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
    n_pix = shape[0] * shape[1] * shape[2] if shape is not None else None
    side = round(np.sqrt(len(pixel_cols)))
    if (n_pix is not None and len(pixel_cols) != n_pix) or (
            n_pix is None and (side * side != len(pixel_cols) or not pixel_cols)):
        want = f"{n_pix} pixel columns" if n_pix else "a square number of pixel columns"
        raise expected(f"a CSV with {want} (plus optional 'label' and 'id' columns)",
                       f"{len(pixel_cols)} pixel columns in {path}", cls=DataError)
    pixels = df[pixel_cols]
    non_numeric = [c for c in pixel_cols if not pd.api.types.is_numeric_dtype(pixels[c])]
    if non_numeric:
        raise expected("numeric pixel values in every pixel column",
                       f"non-numeric values in column {non_numeric[0]!r} of {path}",
                       cls=DataError)
    images = to_unit_float(pixels.to_numpy(), shape=shape, what=f"the pixel rows of {path}")
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


#: The largest array a file may declare: a header is checked against this before any memory is
#: allocated (a 100-byte .npy can claim a shape of 10^12 images).
MAX_ARRAY_BYTES = 8 << 30


def _check_npy_header(fp, size: int, where: str) -> None:
    """Read a ``.npy`` header from ``fp`` and refuse object arrays, or data the header claims
    but the file cannot hold (``size`` bytes in all) or memory cannot take."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fp)
        read = (npformat.read_array_header_1_0 if version == (1, 0)
                else npformat.read_array_header_2_0)
        shape, _, dtype = read(fp, max_header_size=10_000)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise expected("a .npy/.npz file of numeric arrays",
                       f"{where} (not a NumPy array: {type(exc).__name__})",
                       cls=DataError) from None
    if dtype.hasobject:
        raise expected("a .npy/.npz file of numeric arrays",
                       f"{where} (pickled objects, which are refused)", cls=DataError)
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > MAX_ARRAY_BYTES:
        raise expected(f"an array of at most {MAX_ARRAY_BYTES >> 30} GiB",
                       f"{where} declaring shape {shape} ({need / 2**30:.3g} GiB)", cls=DataError)
    if need > size - fp.tell():
        raise expected("an array file as long as its header says",
                       f"{where} declaring shape {shape} but holding {size} bytes",
                       cls=DataError)


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as fp:
        _check_npy_header(fp, path.stat().st_size, str(path))
    return np.load(path, allow_pickle=False)


def _read_npz(path: Path) -> tuple[dict, list[str]]:
    """The arrays of an ``.npz`` we use (images and labels), each header checked first."""
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise expected("a .npy/.npz file of numeric arrays",
                       f"{path} (not a NumPy archive: {type(exc).__name__})",
                       cls=DataError) from None
    with zf:
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        keys = list(members)
        out = {}
        for group in (("x", "images", "x_test", "x_train", "arr_0"),
                      ("y", "labels", "y_test", "y_train")):
            key = next((k for k in group if k in members), None)
            if key is None:
                continue
            info = zf.getinfo(members[key])
            try:
                with zf.open(info) as fp:
                    _check_npy_header(fp, info.file_size, f"{path}[{key}]")
                with zf.open(info) as fp:
                    out[group[0]] = np.lib.format.read_array(fp, allow_pickle=False)
            except DataError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise expected("a .npy/.npz file of numeric arrays",
                               f"{path}[{key}] ({type(exc).__name__})", cls=DataError) from None
    return out, keys


def _load_array(path: Path, shape) -> ImageSet:
    labels = None
    if path.suffix.lower() == ".npz":
        arrays, keys = _read_npz(path)
        if "x" not in arrays:
            raise expected("an .npz with an array named 'x' or 'images'",
                           f"arrays {keys} in {path}", cls=DataError)
        arr = arrays["x"]
        if "y" in arrays:
            labels = _int_labels(arrays["y"], path)
    else:
        arr = _read_npy(path)
    images = to_unit_float(arr, shape=shape, what=f"the array in {path}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise expected(f"one label per image ({images.shape[0]})", f"shape {labels.shape}",
                       cls=DataError)
    return ImageSet(images, [str(i) for i in range(images.shape[0])], labels)


def load_images(path: str | Path, *, shape: tuple[int, int, int] | None = None,
                skip_bad: bool = False) -> ImageSet:
    """Read images from a ``.npy``/``.npz`` array, a ``.csv`` of pixel rows, an image file or a
    folder of image files (sub-folders name classes).

    Args:
        shape: the model's image shape ``(H, W, C)`` to bring every image to (resizing with a
            note); ``None`` keeps the images' own shape (then a folder's images must share one).
        skip_bad: in a folder, leave out the files that cannot be decoded (listed in
            ``ImageSet.skipped``) instead of failing; other inputs are one file, read or not.

    Returns:
        An :class:`ImageSet` whose ``images`` are ``(N, H, W)`` or ``(N, H, W, 3)`` float32 in
        [0, 1].
    """
    path = Path(path)
    if not path.exists():
        raise expected("an existing file or folder of images", f"{path} (not found)",
                       cls=DataError)
    if path.is_dir():
        return _load_folder(path, shape, skip_bad=skip_bad)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _load_array(path, shape)
    if suffix == ".csv":
        return _load_csv(path, shape)
    if suffix in IMAGE_SUFFIXES:
        channels = None if shape is None else shape[2]
        img = decode_image_bytes(path.read_bytes(), name=str(path), channels=channels)
        return ImageSet(to_unit_float(img[None], shape=shape, what=str(path)), [path.name])
    raise expected("a .npy, .npz, .csv, image file or a folder of images",
                   f"{path} (unknown suffix {suffix!r})", cls=DataError)
