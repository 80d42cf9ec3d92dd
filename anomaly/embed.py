"""Other uses of a trained encoder/decoder: latent codes (``anomaly embed``) and
reconstructions (``anomaly denoise``, alias ``anomaly reconstruct``).

Latent codes are the encoder's output for each image: the posterior means for the VAEs, the
code for the plain autoencoders; ``(N, code_dim)`` float32 (``code_dim`` counts the 6 affine
units of ``affine-vae``). Files:

- ``.npy``: the codes, ``(N, code_dim)`` float32.
- ``.npz``: ``codes`` ``(N, code_dim)``, ``ids`` ``(N,)`` and, for labelled input, ``labels``.
- ``.csv``: columns ``id``, ``label`` (labelled input only), ``z0`` .. ``z{code_dim-1}``;
  written with 9 significant digits, so float32 codes read back exactly.

Reconstructions are ``(N, H, W[, C])`` float32 in [0, 1] (decoded at the posterior mean; with
``normalize=True`` an ``affine-vae`` decodes with the identity transform). A model trained with
``--denoise STD`` learned to map noisy inputs to clean images, so its reconstructions of noisy
images are denoised. Files:

- ``.npy``: the images ``(N, H, W[, C])`` float32.
- ``.npz``: ``x`` (the images), ``ids`` and, for labelled input, ``y``.
- ``.csv``: ``id`` then one column per pixel value ``p0`` .. ``p{H*W*C-1}`` (floats in [0, 1],
  9 digits).
- a folder (a path without one of those suffixes): one 8-bit grayscale (or RGB) PNG per image, named
  after the input's ids (``0.png``, ``1.png`` ... for arrays and CSV rows).

Every output reads back with :func:`anomaly.data.images.load_images` (the ``.npy``, ``.npz`` and
``.csv`` ones exactly, the PNGs within 1/255).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.errors import ConfigError, DataError, expected
from anomaly.utils import atomic_dir, atomic_write_bytes, atomic_write_text

CODE_SUFFIXES = (".csv", ".npy", ".npz")


def check_output(path: str | Path, *, codes: bool) -> Path:
    """Refuse an output path :func:`write_codes` (``codes=True``) or :func:`write_images`
    cannot write, before any work is done."""
    path = Path(path)
    suffix = path.suffix.lower()
    if codes and suffix not in CODE_SUFFIXES:
        raise expected(f"an --output path ending in {', '.join(CODE_SUFFIXES)}", str(path),
                       cls=ConfigError)
    if not codes and suffix not in CODE_SUFFIXES:
        if suffix in (".png", ".jpg", ".jpeg"):
            raise expected("an --output folder for PNG files (or a .npy/.npz/.csv file)",
                           f"{path} (a single image file name)", cls=ConfigError)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise expected("an --output folder that does not exist yet or is empty",
                           f"{path} (exists)", cls=ConfigError)
    return path


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_codes(path: str | Path, codes: np.ndarray, ids: list[str] | None = None,
                labels: np.ndarray | None = None) -> Path:
    """Write latent codes ``(N, code_dim)`` to ``.csv``, ``.npy`` or ``.npz`` (atomically)."""
    path = Path(path)
    codes = np.asarray(codes, dtype=np.float32)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(codes))]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        atomic_write_bytes(path, _npy_bytes(codes))
    elif suffix == ".npz":
        extra = {"labels": np.asarray(labels)} if labels is not None else {}
        atomic_write_bytes(path, _npz_bytes(codes=codes, ids=np.asarray(ids, dtype=str),
                                            **extra))
    elif suffix == ".csv":
        df = pd.DataFrame(codes, columns=[f"z{i}" for i in range(codes.shape[1])])
        if labels is not None:
            df.insert(0, "label", np.asarray(labels))
        df.insert(0, "id", ids)
        atomic_write_text(path, df.to_csv(index=False, float_format="%.9g"))
    else:
        check_output(path, codes=True)
    return path


def read_codes(path: str | Path) -> tuple[np.ndarray, list[str] | None, np.ndarray | None]:
    """Read what :func:`write_codes` wrote: ``(codes, ids, labels)`` (``None`` where absent)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            labels = z.get("labels")
            return z["codes"], [str(i) for i in z["ids"]], labels
    if suffix == ".csv":
        df = pd.read_csv(path, dtype={"id": str})
        zcols = [c for c in df.columns if re.fullmatch(r"z\d+", str(c))]
        labels = df["label"].to_numpy() if "label" in df.columns else None
        return df[zcols].to_numpy(np.float32), df["id"].tolist(), labels
    raise expected(f"a codes file ending in {', '.join(CODE_SUFFIXES)}", str(path),
                   cls=DataError)


def _png_name(image_id: str, index: int, used: set[str]) -> str:
    stem = Path(image_id).with_suffix("").as_posix().replace("/", "__")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or str(index)
    name = f"{stem}.png"
    if name in used:
        name = f"{stem}-{index}.png"
    used.add(name)
    return name


def write_images(path: str | Path, images: np.ndarray, ids: list[str] | None = None,
                 labels: np.ndarray | None = None) -> Path:
    """Write images ``(N, H, W[, 3])`` in [0, 1] to ``.npy``, ``.npz``, ``.csv`` or a folder of
    PNG files (any other path), atomically."""
    from PIL import Image

    path = Path(path)
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        atomic_write_bytes(path, _npy_bytes(images))
    elif suffix == ".npz":
        extra = {"y": np.asarray(labels)} if labels is not None else {}
        atomic_write_bytes(path, _npz_bytes(x=images, ids=np.asarray(ids, dtype=str), **extra))
    elif suffix == ".csv":
        df = pd.DataFrame(images.reshape(len(images), -1),
                          columns=[f"p{i}" for i in range(images[0].size)])
        df.insert(0, "id", ids)
        atomic_write_text(path, df.to_csv(index=False, float_format="%.9g"))
    else:
        check_output(path, codes=False)
        used: set[str] = set()
        with atomic_dir(path) as tmp:
            for i, (img, image_id) in enumerate(zip(images, ids, strict=True)):
                u8 = np.rint(img * 255.0).astype(np.uint8)
                Image.fromarray(u8, mode="L" if u8.ndim == 2 else "RGB").save(
                    tmp / _png_name(image_id, i, used))
    return path


def embed(detector, images) -> np.ndarray:
    """Latent codes ``(N, code_dim)`` float32 of images ``(N, H, W[, C])`` (posterior means)."""
    return np.asarray(detector.encode(images), dtype=np.float32)


def reconstruct(detector, images, *, normalize: bool = False, scale: int = 1) -> np.ndarray:
    """Reconstructions ``(N, scale*H, scale*W[, C])`` float32 in [0, 1]; see
    :meth:`Detector.reconstruct`."""
    if normalize and detector.model != "affine-vae":
        raise expected("an affine-vae artifact for --normalize (the transform-free "
                       "reconstruction)", detector.model, cls=ConfigError)
    if scale != 1 and detector.model != "affine-vae":
        raise expected("an affine-vae artifact for --size (its coordinate decoder is "
                       "resolution-free)", detector.model, cls=ConfigError)
    return np.asarray(detector.reconstruct(images, normalize=normalize, scale=scale),
                      dtype=np.float32)
