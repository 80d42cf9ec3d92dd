"""A synthetic data set in the MVTec AD layout: textured colour images with painted defects.

    python bench/synthetic_mvtec.py data/synthetic-mvtec --train 1000 --size 128 --seed 0

Writes ``ROOT/train/good/*.png``, ``ROOT/test/good/*.png``, ``ROOT/test/<defect>/*.png`` and
``ROOT/ground_truth/<defect>/<name>_mask.png`` (white = defect) for four defect types:

- ``scratch``: a thin bright or dark line segment;
- ``spot``: a filled ellipse of a foreign colour;
- ``missing``: a rectangle of the texture replaced by a flat dark ground;
- ``colour``: a blob whose colour channels are shifted (the texture stays, its hue changes).

Normal images are one "material": a woven texture (two sinusoidal gratings at random phases and
a slightly varying angle), a colour gradient and fine pixel noise, so every normal image differs
and none is a copy of another. Seeded: the same arguments write the same files. It is a
generator, not a real data set: its figures say how the pipeline behaves, not how well a model
does on real defects.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFECTS = ("scratch", "spot", "missing", "colour")


def texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One normal image: float32 ``(H, W, 3)`` in [0, 1]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.normal(0.0, 0.05)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = 16.0 * max(h, w) / 128.0
    weave = (0.5 + 0.25 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
             + 0.25 * np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)))
    base = np.array([0.55, 0.45, 0.30], np.float32) + rng.normal(0, 0.02, 3).astype(np.float32)
    ramp = (0.1 * (yy / h - 0.5))[..., None]
    img = base * (0.6 + 0.4 * weave[..., None]) + ramp
    img += rng.normal(0, 0.02, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _ellipse(rng, h, w, lo, hi) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
    ry, rx = rng.uniform(lo, hi) * h, rng.uniform(lo, hi) * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def paint(rng: np.random.Generator, img: np.ndarray, defect: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect into ``img`` ``(H, W, 3)``; returns the image and its mask ``(H, W)``."""
    h, w = img.shape[:2]
    out = img.copy()
    if defect == "scratch":
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (w, h), 0)
        p0 = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)
        length, theta = rng.uniform(0.3, 0.6) * max(h, w), rng.uniform(0, np.pi)
        p1 = (p0[0] + length * np.cos(theta), p0[1] + length * np.sin(theta))
        ImageDraw.Draw(canvas).line([p0, p1], fill=255, width=int(rng.integers(2, 4)))
        mask = np.asarray(canvas) > 0
        out[mask] = 0.95 if rng.random() < 0.5 else 0.05
    elif defect == "spot":
        mask = _ellipse(rng, h, w, 0.04, 0.10)
        out[mask] = rng.choice([[0.1, 0.3, 0.8], [0.2, 0.7, 0.2], [0.9, 0.1, 0.1]])
    elif defect == "missing":
        y0, x0 = rng.integers(0, int(0.7 * h)), rng.integers(0, int(0.7 * w))
        dy, dx = rng.integers(h // 10, h // 4), rng.integers(w // 10, w // 4)
        mask = np.zeros((h, w), bool)
        mask[y0:y0 + dy, x0:x0 + dx] = True
        out[mask] = 0.08
    elif defect == "colour":
        mask = _ellipse(rng, h, w, 0.08, 0.16)
        out[mask] = out[mask][:, [2, 0, 1]]  # the same texture, its channels rotated
    else:
        raise ValueError(f"Expected a defect in {DEFECTS}. Received: {defect!r}")
    return np.clip(out, 0, 1), mask


def _save(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.round(arr * 255).astype(np.uint8) if arr.dtype != bool else arr.astype(np.uint8) * 255
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(data).save(tmp, format="PNG")
    tmp.replace(path)  # a killed run leaves no half-written image


def generate(root: str | Path, *, n_train: int = 1000, n_test_good: int = 100,
             n_test_defect: int = 40, size: tuple[int, int] = (128, 128), seed: int = 0,
             defects: tuple[str, ...] = DEFECTS) -> Path:
    """Write the data set under ``root`` (see the module docstring) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(texture(rng, size), root / "train" / "good" / f"{i:04d}.png")
    for i in range(n_test_good):
        _save(texture(rng, size), root / "test" / "good" / f"{i:04d}.png")
    for defect in defects:
        for i in range(n_test_defect):
            img, mask = paint(rng, texture(rng, size), defect)
            _save(img, root / "test" / defect / f"{i:04d}.png")
            _save(mask, root / "ground_truth" / defect / f"{i:04d}_mask.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test-good", type=int, default=100)
    p.add_argument("--test-defect", type=int, default=40, help="images per defect type")
    p.add_argument("--size", default="128x128", help="HxW")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    h, _, w = a.size.partition("x")
    generate(a.root, n_train=a.train, n_test_good=a.test_good, n_test_defect=a.test_defect,
             size=(int(h), int(w or h)), seed=a.seed)
    print(a.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
