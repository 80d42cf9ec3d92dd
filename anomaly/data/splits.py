"""One-class splits: normal training data, a normal validation hold-out, and the labelled test set.

The test split is used for evaluation only. Model selection (early stopping) and threshold
calibration see only the training split: its normal images minus a hold-out, the hold-out itself,
and, on request, a few anomalies drawn from the training split's other classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from anomaly.errors import ConfigError, expected


def parse_classes(value, class_names: tuple[str, ...] | None = None,
                  n_classes: int | None = None, *, leave_anomalies: bool = True
                  ) -> tuple[int, ...]:
    """Parse ``--normal-class``: ``0``, ``"0,6"``, ``"0-2"``, ``[0, 6]`` or class names.

    Args:
        leave_anomalies: refuse a selection of every class (nothing would be anomalous).

    Returns:
        Sorted tuple of distinct class indices.
    """
    if n_classes is None and class_names is not None:
        n_classes = len(class_names)
    if isinstance(value, int | np.integer):
        items: list = [int(value)]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [s.strip() for s in str(value).split(",") if s.strip()]
    out: set[int] = set()
    valid = f"0..{n_classes - 1}" if n_classes else "non-negative integers"
    names = {n.lower(): i for i, n in enumerate(class_names or ())}
    for item in items:
        if isinstance(item, str) and item.lower() in names:
            out.add(names[item.lower()])
            continue
        if isinstance(item, str) and "-" in item.strip("-"):
            lo, _, hi = item.partition("-")
            try:
                lo_i, hi_i = int(lo), int(hi)
            except ValueError:
                raise expected(f"class indices in {valid} (e.g. 0 or 0,6 or 0-2)", repr(value),
                               cls=ConfigError) from None
            limit = n_classes if n_classes is not None else 10_000
            if not 0 <= lo_i <= hi_i < limit:
                raise expected(f"a class range within {valid}", repr(item), cls=ConfigError)
            items.extend(range(lo_i, hi_i + 1))
            continue
        try:
            idx = int(item)
            if isinstance(item, float) and item != idx:
                raise ValueError
        except (TypeError, ValueError):
            raise expected(f"class indices in {valid} (e.g. 0 or 0,6)", repr(value),
                           cls=ConfigError) from None
        if idx < 0 or (n_classes is not None and idx >= n_classes):
            raise expected(f"class indices in {valid}", idx, cls=ConfigError)
        out.add(idx)
    if not out:
        raise expected("at least one normal class (e.g. --normal-class 0)", repr(value),
                       cls=ConfigError)
    if leave_anomalies and n_classes is not None and len(out) == n_classes:
        raise expected(f"at most {n_classes - 1} normal classes so that some are anomalies",
                       sorted(out), cls=ConfigError)
    return tuple(sorted(out))


#: The fewest runs a hold-out is cut into: a smaller data set gets shorter runs, so its hold-out
#: is not one stretch of the files.
MIN_HOLDOUT_RUNS = 10


def holdout(n: int, fraction: float, seed: int, run: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` images into training and hold-out positions (each sorted).

    The one hold-out rule: :func:`split_one_class` and ``Detector.fit`` without ``x_val`` both
    use it, so a detector fitted on the same normal images with the same seed is the same.

    Args:
        n: number of images, in their stored order.
        fraction: the hold-out's share, in (0, 0.5].
        seed: seed of the draw.
        run: hold out runs of this many consecutive images (seeded runs, the last one cut to
            size), shortened so the hold-out has at least :data:`MIN_HOLDOUT_RUNS` of them;
            1 draws single images. Images stored next to each other often share a writer, a
            scanner or a production batch (MNIST's training file keeps a writer's digits
            within a few hundred places): a hold-out of single images then shares them with the
            training images and scores lower than new data, which sets thresholds that flag
            more new normals than they promise.

    Returns:
        ``(train_idx, holdout_idx)``; the hold-out has ``max(2, round(n * fraction))`` images
        (calibration needs two or more).
    """
    if not 0.0 < fraction <= 0.5:
        raise expected("val_fraction in (0, 0.5]", fraction, cls=ConfigError)
    if isinstance(run, bool) or not isinstance(run, int | np.integer) or run < 1:
        raise expected("holdout_run as an integer >= 1", repr(run), cls=ConfigError)
    n_val = max(2, round(n * fraction))
    if n - n_val < 2:
        raise expected("at least 4 normal training images", n, cls=ConfigError)
    run = max(1, min(int(run), n_val // MIN_HOLDOUT_RUNS))
    starts = np.random.default_rng(seed).permutation(-(-n // run)) * run
    # run == 1 is the plain permutation, so single-image hold-outs stay what they were.
    order = (starts[:, None] + np.arange(run)).ravel()
    val = order[order < n][:n_val]
    keep = np.ones(n, bool)
    keep[val] = False
    return np.flatnonzero(keep), np.sort(val)


@dataclass
class TestSet:
    """Labelled test images.

    Attributes:
        x: ``(N, H, W[, C])`` float32 in [0, 1].
        y: ``(N,)`` 1 = anomaly, 0 = normal.
        classes: ``(N,)`` original class of each image.
        class_names: names of the classes where known.
        dataset: the data set's name; ``normal_classes`` the normal classes.
        masks: ``(N, H, W)`` bool ground-truth defect pixels where the data set has them
            (MVTec AD layout), else ``None``; ``has_mask`` ``(N,)`` False for images whose
            pixels are left out of the pixel metrics (a defect image without a mask).
    """

    __test__ = False  # not a pytest class

    x: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...] | None
    dataset: str
    normal_classes: tuple[int, ...]
    masks: np.ndarray | None = None
    has_mask: np.ndarray | None = None


@dataclass
class OneClassSplit:
    """The one split of a run: fit, calibration, evaluation and the report all use it.

    Attributes:
        x_train: normal training images, ``(n_train, H, W[, C])`` float32 in [0, 1] (an
            array, or :class:`~anomaly.data.stream.DiskImages` when they are streamed).
        x_val: normal hold-out images for early stopping and calibration, ``(n_val, ...)``
            (likewise).
        x_test: test images, ``(n_test, ...)``; ``y_test`` (``(n_test,)``) is 1 for anomalies.
        test_classes: original class label of each test image, ``(n_test,)``.
        x_cal_anomalies: optional labelled anomalies from the training split, ``(n_cal, ...)``.
        normal_classes, class_names, dataset, source: what the images are.
        test_masks, test_has_mask: the test images' pixel masks ``(n_test, H, W)`` and which
            of them are known ``(n_test,)``, or ``None`` (see :class:`TestSet`).
        skipped: ``(file, reason)`` of the bad files a ``skip_bad`` load left out.
    """

    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    test_classes: np.ndarray | None
    x_cal_anomalies: np.ndarray | None = None
    normal_classes: tuple[int, ...] = (0,)
    class_names: tuple[str, ...] | None = None
    dataset: str = ""
    source: str = ""
    test_masks: np.ndarray | None = None
    test_has_mask: np.ndarray | None = None
    skipped: list = field(default_factory=list)

    @property
    def test(self) -> TestSet | None:
        """The labelled test images, or ``None`` when there are none."""
        if self.x_test is None or self.y_test is None:
            return None
        return TestSet(self.x_test, self.y_test, np.asarray(self.test_classes),
                       self.class_names, self.dataset, tuple(self.normal_classes),
                       self.test_masks, self.test_has_mask)


def _as_unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x


def split_one_class(x_train: np.ndarray, y_train: np.ndarray | None, x_test: np.ndarray | None,
                    y_test: np.ndarray | None, normal_classes: tuple[int, ...], *,
                    val_fraction: float = 0.1, calibration_anomalies: int = 0,
                    train_limit: int | None = None, seed: int = 0, holdout_run: int = 1,
                    **about) -> OneClassSplit:
    """Select the normal classes, hold out a validation part and label the test set.

    Args:
        x_train: training images ``(n, H, W[, C])``, uint8 or float in [0, 1]; anything that
            indexes like an array (:class:`~anomaly.data.stream.DiskImages`) is split
            without being read.
        y_train: class labels ``(n,)``, or ``None`` when every training image is normal.
        x_test, y_test: test images and class labels, or ``None`` for no evaluation.
        normal_classes: class indices that are normal; all others are anomalies.
        val_fraction: fraction of the normal training images held out, in (0, 0.5].
        calibration_anomalies: how many training-split anomalies to draw for calibration.
        train_limit: use at most this many of the normal training images (a seeded subset,
            taken after the normal class is picked, before the hold-out).
        seed: seed of the subset, the hold-out and the calibration anomalies.
        holdout_run: hold out runs of this many consecutive normal images (:func:`holdout`).
        about: ``class_names``, ``dataset``, ``source`` (and ``test_masks``,
            ``test_has_mask``) for the split object.
    """
    normal = np.ones(len(x_train), bool) if y_train is None else np.isin(y_train, normal_classes)
    normal_idx = np.flatnonzero(normal)
    if train_limit is not None and train_limit < len(normal_idx):
        if train_limit < 1:
            raise expected("a positive train_limit", train_limit, cls=ConfigError)
        pick = np.random.default_rng(seed).permutation(len(normal_idx))[:train_limit]
        normal_idx = normal_idx[np.sort(pick)]
    train_pos, val_pos = holdout(len(normal_idx), val_fraction, seed, holdout_run)
    x_cal = None
    if calibration_anomalies:
        if y_train is None:
            raise expected("labelled training data for --calibration-anomalies",
                           "unlabelled images", cls=ConfigError)
        anomalies = np.flatnonzero(~normal)
        if len(anomalies) == 0:
            raise expected("anomalies in the training split for --calibration-anomalies",
                           "none", cls=ConfigError)
        pick = np.random.default_rng(seed + 1).choice(
            anomalies, size=min(calibration_anomalies, len(anomalies)), replace=False)
        x_cal = _as_unit(x_train[np.sort(pick)])
    y_bin = classes = None
    if x_test is not None and y_test is not None:
        classes = np.asarray(y_test)
        y_bin = (~np.isin(classes, normal_classes)).astype(np.int64)
    return OneClassSplit(
        x_train=_as_unit(x_train[normal_idx[train_pos]]),
        x_val=_as_unit(x_train[normal_idx[val_pos]]),
        x_test=_as_unit(x_test) if x_test is not None else None,
        y_test=y_bin,
        test_classes=classes,
        x_cal_anomalies=x_cal,
        normal_classes=tuple(normal_classes),
        **about,
    )
