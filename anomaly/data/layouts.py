"""How a data set's folder is laid out: a plain folder of images, or the MVTec AD layout.

Plain folder: images of one size, one level of sub-folders naming the classes (see
:mod:`anomaly.data.images`). MVTec AD (Bergmann et al., CVPR 2019)::

    ROOT/train/good/*.png                   normal training images
    ROOT/test/good/*.png                    normal test images
    ROOT/test/<defect>/*.png                anomalies, one folder per defect type
    ROOT/ground_truth/<defect>/<name>_mask.png   pixel masks of the anomalies (white = defect)

A root holding ``train/good`` and ``test`` is read as MVTec AD: training on ``train/good``,
testing on ``test/`` with the classes ``good`` (0) and the defect types (1.., sorted), and the
masks for the pixel-level metrics (:mod:`anomaly.localization`). A defect image without a mask
is still scored as an image; its pixels are left out of the pixel metrics, with a note.

Both layouts take the run's ``image_size`` (resize every image, and every mask, to ``HxW``) and
``grayscale`` (colour to grey) settings (:func:`target_shape`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.data.images import (
    IMAGE_SUFFIXES,
    ImageSet,
    decode_image_bytes,
    image_shape_of,
    load_images,
    stack_images,
    to_unit_float,
)
from anomaly.errors import ConfigError, DataError, expected

_log = logging.getLogger(__name__)

#: The smallest side a network is trained on: below it there is nothing left to encode after
#: one stride-2 stage, and a 1x1 "image" is almost always a mistake (a wrong array axis).
MIN_TRAIN_SIDE = 8
#: The largest side accepted by ``image_size`` (the conv models are built and tested to 256;
#: beyond 1024 one image's activations stop fitting a CPU's memory at the default widths).
MAX_TRAIN_SIDE = 1024
GOOD = "good"


def parse_image_size(value) -> tuple[int, int] | None:
    """``"128x96"`` -> ``(128, 96)`` (height, width); ``"64"`` -> ``(64, 64)``; ``None`` -> ``None``."""
    if value is None:
        return None
    text = str(value).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+)(?:[x\u00d7,](\d+))?", text)
    if not m:
        raise expected("image_size as HxW, e.g. 128x128", repr(value), cls=ConfigError)
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if not (MIN_TRAIN_SIDE <= h <= MAX_TRAIN_SIDE and MIN_TRAIN_SIDE <= w <= MAX_TRAIN_SIDE):
        raise expected(f"image_size sides in {MIN_TRAIN_SIDE}..{MAX_TRAIN_SIDE}", repr(value),
                       cls=ConfigError)
    return h, w


def check_trainable(images: np.ndarray, what: str = "training images") -> None:
    """Refuse images ``(N, H, W[, C])`` too small to train a network on (e.g. 1x1)."""
    h, w = images.shape[1:3]
    if min(h, w) < MIN_TRAIN_SIDE:
        raise expected(f"{what} of at least {MIN_TRAIN_SIDE}x{MIN_TRAIN_SIDE} pixels",
                       f"{h}x{w}", hint="Pass --image-size HxW to resize them.", cls=DataError)


def target_shape(images: np.ndarray, image_size: tuple[int, int] | None,
                 grayscale: bool) -> tuple[int, int, int]:
    """The ``(H, W, C)`` a run trains at: ``image_size`` or the images' own size, grey when
    ``grayscale``, else the images' own channels."""
    h, w = image_size or images.shape[1:3]
    c = 1 if grayscale or images.ndim == 3 else images.shape[3]
    return int(h), int(w), int(c)


def apply_size(images: np.ndarray, image_size: tuple[int, int] | None, grayscale: bool,
               what: str = "images") -> np.ndarray:
    """Bring images ``(N, H, W[, 3])`` (uint8 or [0, 1] floats) to the run's size and
    channels; unchanged when neither setting is given."""
    if image_size is None and not grayscale:
        return images
    shape = target_shape(images, image_size, grayscale)
    return to_unit_float(images, shape=shape, what=what)


def _collapse_grey(images: np.ndarray) -> np.ndarray:
    """Colour images ``(N, H, W, 3)`` whose channels are all equal are grey ``(N, H, W)``."""
    if images.ndim == 4 and np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(
            images[..., 1], images[..., 2]):
        return np.ascontiguousarray(images[..., 0])
    return images


def load_folder(path: str | Path, *, image_size: tuple[int, int] | None = None,
                grayscale: bool = False, skip_bad: bool = False) -> ImageSet:
    """A plain folder (or file) of images at the run's size: see :func:`load_images`.

    Without ``image_size`` the images must share one size (the error names the sizes found and
    ``--image-size``); with it every image is resized. Returns images ``(N, H, W)`` or
    ``(N, H, W, 3)``.
    """
    if image_size is None:
        out = load_images(path, skip_bad=skip_bad)
        if grayscale:
            out.images = apply_size(out.images, None, True, what=str(path))
        return out
    h, w = image_size
    # Colour first, so no colour file loses its colour; all-grey data is grey again after.
    out = load_images(path, shape=(h, w, 1 if grayscale else 3), skip_bad=skip_bad)
    out.images = _collapse_grey(out.images)
    return out


def is_mvtec(path: str | Path) -> bool:
    """Whether ``path`` is laid out like MVTec AD (``train/good`` and ``test`` folders)."""
    p = Path(path)
    return p.is_dir() and (p / "train" / GOOD).is_dir() and (p / "test").is_dir()


@dataclass
class MVTecData:
    """An MVTec AD category read at the run's size.

    Attributes:
        x_train: normal training images ``(n_train, H, W[, 3])`` float32 in [0, 1].
        x_test: test images ``(n_test, H, W[, 3])``; ``classes`` ``(n_test,)`` their class
            (0 = good, 1.. = the defect types of ``class_names``), ``ids`` their paths under
            ``test/``.
        masks: ``(n_test, H, W)`` bool, True on defect pixels (all False for good images and
            for defect images without a mask); ``has_mask`` ``(n_test,)`` False where a defect
            image's mask is missing (its pixels are left out of the pixel metrics).
    """

    x_train: np.ndarray
    x_test: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    ids: list[str]
    masks: np.ndarray
    has_mask: np.ndarray


def image_files(folder: Path) -> list[Path]:
    """A folder's own image files (no sub-folders), sorted: what an MVTec AD folder holds."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _decode(paths: list[Path], channels: int | None) -> list[np.ndarray]:
    return [decode_image_bytes(p.read_bytes(), name=str(p), channels=channels) for p in paths]


def _mask_for(root: Path, defect: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / defect
    for suffix in (image.suffix, ".png"):
        for name in (f"{image.stem}_mask{suffix}", f"{image.stem}{suffix}"):
            if (folder / name).is_file():
                return folder / name
    return None


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if mask.shape == size:
        return mask
    # Nearest neighbour keeps a mask binary and its regions where they were.
    pil = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(pil.resize(size[::-1], Image.Resampling.NEAREST)) > 127


def load_mvtec(path: str | Path, *, image_size: tuple[int, int] | None = None,
               grayscale: bool = False) -> MVTecData:
    """Read an MVTec AD category (see the module docstring) at the run's size and channels.

    Raises:
        DataError: no training images, an empty defect folder, a mask that is not the size of
            its image, training images of several sizes without ``image_size``.
    """
    root = Path(path)
    train_files = image_files(root / "train" / GOOD)
    if not train_files:
        raise expected(f"image files in {root / 'train' / GOOD}", "none", cls=DataError)
    channels = 1 if grayscale else None
    raw_train = _decode(train_files, channels)
    if image_size is None:
        x_train = stack_images(raw_train, [str(p) for p in train_files])
        if grayscale:
            x_train = apply_size(x_train, None, True)
    else:
        c = 1 if grayscale else 3
        x_train = _collapse_grey(stack_images(raw_train, [str(p) for p in train_files],
                                              shape=(*image_size, c)))
    del raw_train
    check_trainable(x_train)
    test = load_mvtec_test(root, image_shape_of(x_train))
    return MVTecData(x_train, *test)


def load_mvtec_test(root: str | Path, shape: tuple[int, int, int]) -> tuple:
    """The test part of an MVTec AD category at the training images' ``shape`` ``(H, W, C)``:
    ``(x_test, classes, class_names, ids, masks, has_mask)`` as in :class:`MVTecData`.

    Raises:
        DataError: an empty defect folder, a mask that is not the size of its image.
    """
    root = Path(root)
    test_root = root / "test"
    folders = sorted(p for p in test_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # good first, so the images are in class order (good = class 0, then the defects).
    folders.sort(key=lambda p: (p.name != GOOD, p.name))
    defects = [p.name for p in folders if p.name != GOOD]
    class_names = (GOOD, *defects)
    images, classes, ids, masks, has_mask = [], [], [], [], []
    n_missing = 0
    for folder in folders:
        files = image_files(folder)
        if not files:
            raise expected(f"image files in the test folder {folder}", "an empty folder",
                           hint="Remove the folder or add its images.", cls=DataError)
        label = class_names.index(folder.name)
        raw = _decode(files, shape[2])
        for file, img in zip(files, raw, strict=True):
            mask = np.zeros(img.shape[:2], bool)
            ok = True
            if label:
                mask_path = _mask_for(root, folder.name, file)
                if mask_path is None:
                    ok = False
                    n_missing += 1
                else:
                    mask = decode_image_bytes(mask_path.read_bytes(), name=str(mask_path),
                                              channels=1) > 127
                    if mask.shape != img.shape[:2]:
                        raise expected(f"the mask {mask_path} to be the size of its image "
                                       f"({img.shape[0]}x{img.shape[1]})",
                                       f"{mask.shape[0]}x{mask.shape[1]}", cls=DataError)
            masks.append(_resize_mask(mask, shape[:2]))
            has_mask.append(ok)
        images.append(stack_images(raw, [str(p) for p in files], shape=shape))
        classes += [label] * len(files)
        ids += [str(p.relative_to(test_root)) for p in files]
    if not images:
        raise expected(f"test folders (good/ and defect types) in {test_root}", "none",
                       cls=DataError)
    if n_missing:
        _log.info("%d defect image(s) of %s have no mask in ground_truth/: they are scored as "
                  "images, their pixels are left out of the pixel metrics", n_missing, root)
    return (np.concatenate(images), np.asarray(classes, np.int64), class_names, ids,
            np.stack(masks), np.asarray(has_mask, bool))
