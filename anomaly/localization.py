"""Pixel-level metrics: how well per-pixel error maps find the defect pixels of ground-truth masks.

- **Pixel AUROC**: the ROC AUC over every pixel of the images that have a mask (normal images'
  masks are all background), scores = the error map's values.
- **PRO** (per-region overlap, Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV
  2021), as anomalib's ``AUPRO`` reports it: the defect pixels are split into connected regions
  (8-connectivity, per image); at each threshold the *overlap* of a region is the fraction of its
  pixels above the threshold and the *PRO* the mean overlap over all regions, while the FPR is
  the fraction of all background pixels above it. The PRO curve is integrated over FPR from 0 to
  :data:`PRO_FPR_LIMIT` (30%), linearly interpolated at the limit, and divided by the limit so
  that a perfect map scores 1 and a random one about 0.15.

The PRO curve is computed exactly, without a threshold grid: it is the ROC curve in which each
defect pixel weighs ``1 / (number of regions * its region's size)`` (so each region weighs the
same, whatever its size) and each background pixel 1.
"""

from __future__ import annotations

import numpy as np

from anomaly.errors import DataError, expected

#: The FPR up to which the PRO curve is integrated (the MVTec AD paper's and anomalib's 30%).
PRO_FPR_LIMIT = 0.3


def _check(error_maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(error_maps, dtype=np.float64)
    truth = np.asarray(masks).astype(bool)
    if maps.ndim == 4:  # colour error maps: a pixel's error is the mean over its channels
        maps = maps.mean(axis=-1)
    if maps.ndim == 2:
        maps, truth = maps[None], truth.reshape((1, *truth.shape[-2:]))
    if maps.shape != truth.shape or maps.ndim != 3:
        raise expected("error maps (N, H, W[, C]) and masks (N, H, W) of the same size",
                       f"shapes {maps.shape} and {truth.shape}", cls=DataError)
    if not np.isfinite(maps).all():
        raise expected("finite error map values", "NaN or Inf", cls=DataError)
    return maps, truth


def pixel_auroc(error_maps, masks) -> float | None:
    """ROC AUC of pixel scores ``(N, H, W[, C])`` against masks ``(N, H, W)`` (True = defect).

    Returns ``None`` when the masks hold only defect or only background pixels.
    """
    from sklearn.metrics import roc_auc_score

    maps, truth = _check(error_maps, masks)
    n_pos = int(truth.sum())
    if n_pos == 0 or n_pos == truth.size:
        return None
    return float(roc_auc_score(truth.ravel(), maps.ravel()))


def regions(masks) -> tuple[np.ndarray, int]:
    """Connected defect regions of masks ``(N, H, W)``: labels ``(N, H, W)`` (0 = background,
    1..R numbered across all images, 8-connectivity) and ``R``."""
    from scipy import ndimage

    truth = np.asarray(masks).astype(bool)
    labels = np.zeros(truth.shape, np.int64)
    total = 0
    for i, mask in enumerate(truth):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        labels[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return labels, total


def pro_curve(error_maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve: ``(fpr, pro)``, each ``(T,)``, increasing in FPR from 0 to 1."""
    from sklearn.metrics import roc_curve

    maps, truth = _check(error_maps, masks)
    labels, n_regions = regions(truth)
    if n_regions == 0 or truth.all():
        raise expected("masks with both defect and background pixels for PRO",
                       "no defect pixels" if n_regions == 0 else "no background pixels",
                       cls=DataError)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n_regions + 1).astype(np.float64)
    weights = np.where(flat > 0, 1.0 / (n_regions * sizes[flat]), 1.0)
    fpr, pro, _ = roc_curve(flat > 0, maps.ravel(), sample_weight=weights,
                            drop_intermediate=False)
    return fpr, pro


def pro_score(error_maps, masks, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """The normalized area under the PRO curve up to ``fpr_limit``, in [0, 1].

    Args:
        error_maps: per-pixel scores ``(N, H, W)`` (or ``(N, H, W, C)``, averaged over C).
        masks: ground truth ``(N, H, W)``, True on defect pixels.
    """
    if not 0 < fpr_limit <= 1:
        raise expected("fpr_limit in (0, 1]", fpr_limit, cls=DataError)
    fpr, pro = pro_curve(error_maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        # The curve's value at the limit, interpolated on the segment that crosses it.
        j = int(np.searchsorted(fpr, fpr_limit))
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[j - 1] + t * (pro[j] - pro[j - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def pixel_metrics(error_maps, masks, has_mask=None) -> dict:
    """Pixel AUROC and PRO of error maps ``(N, H, W[, C])`` against masks ``(N, H, W)``.

    ``has_mask`` ``(N,)`` leaves out the images whose mask is unknown (a defect image without
    one). Returns a JSON-ready dict: ``pixel_auroc``, ``pro`` (``None`` where undefined),
    ``pro_fpr_limit``, ``n_images`` (those with masks), ``n_images_without_mask``,
    ``n_regions`` and ``defect_pixel_fraction``.
    """
    maps, truth = _check(error_maps, masks)
    keep = np.ones(len(maps), bool) if has_mask is None else np.asarray(has_mask, bool)
    if keep.shape != (len(maps),):
        raise expected(f"has_mask of shape ({len(maps)},)", f"shape {keep.shape}",
                       cls=DataError)
    maps, truth = maps[keep], truth[keep]
    out = {"pixel_auroc": None, "pro": None, "pro_fpr_limit": PRO_FPR_LIMIT,
           "n_images": int(keep.sum()), "n_images_without_mask": int((~keep).sum()),
           "n_regions": 0, "defect_pixel_fraction": None}
    if not len(maps):
        return out
    out["n_regions"] = regions(truth)[1]
    out["defect_pixel_fraction"] = float(truth.mean())
    out["pixel_auroc"] = pixel_auroc(maps, truth)
    if out["pixel_auroc"] is not None:
        out["pro"] = pro_score(maps, truth)
    return out
