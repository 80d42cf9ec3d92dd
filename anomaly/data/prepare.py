"""Data prepared once: from a run configuration to the one split object of the run.

``anomaly fit`` calls :func:`prepare` once; training, calibration, evaluation and the report all
use the :class:`~anomaly.data.splits.OneClassSplit` it returns. ``anomaly evaluate`` and
``anomaly report`` on a saved artifact rebuild the same split from the artifact's
``config.yaml`` (:func:`load_test_set`), so no training image is ever scored as a test image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly.config import RunConfig, resolve
from anomaly.data.builtin import DATASETS, load_dataset
from anomaly.data.images import load_images, to_unit_float
from anomaly.data.layouts import (
    MVTecData,
    apply_size,
    check_trainable,
    is_mvtec,
    load_folder,
    load_mvtec,
    load_mvtec_test,
    parse_image_size,
)
from anomaly.data.splits import OneClassSplit, TestSet, parse_classes, split_one_class
from anomaly.data.stream import (
    DiskImages,
    choose_stream,
    is_npy_shards,
    open_images,
    open_mvtec_train,
)
from anomaly.errors import ConfigError, DataError, expected

_log = logging.getLogger(__name__)

#: Share of labelled user images kept for testing when no ``test_data`` is given.
USER_TEST_FRACTION = 0.2


@dataclass
class LabelledData:
    """Training and (optional) test images with labels.

    Images are ``(N, H, W[, C])``: uint8 for the built-in sets, float32 in [0, 1] otherwise.
    ``test_masks`` ``(n_test, H, W)`` bool and ``test_has_mask`` ``(n_test,)``: ground-truth
    defect pixels (MVTec AD layout), else ``None``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: tuple[str, ...] | None
    source: str
    test_masks: np.ndarray | None = None
    test_has_mask: np.ndarray | None = None
    skipped: list = field(default_factory=list)


def load_data(dataset: str, *, test_data: str | None = None, cache_dir: str | None = None,
              seed: int = 0, image_size: str | tuple[int, int] | None = None,
              grayscale: bool = False, skip_bad: bool = False,
              stream: bool = False) -> LabelledData:
    """A built-in data set by name, or a user's images (file, folder or MVTec AD root) by path.

    User data with labels of two or more classes and no ``test_data`` is split (by shuffling
    with ``seed``) into training and test parts (:data:`USER_TEST_FRACTION`); unlabelled or
    single-class user data is all normal training data. An MVTec AD root
    (:func:`~anomaly.data.layouts.is_mvtec`) brings its own test split and masks.
    ``image_size`` (``"HxW"``) resizes every image, ``grayscale`` converts colour to grey.
    ``skip_bad``: see :func:`~anomaly.data.images.load_images`; the files left out are in
    ``skipped``. ``stream``: the training images (and a labelled folder's test part) stay on
    disk as :class:`~anomaly.data.stream.DiskImages` (a folder, MVTec AD or ``.npy`` input).
    """
    size = (parse_image_size(image_size) if not isinstance(image_size, tuple)
            else image_size)
    if dataset in DATASETS:
        ds = load_dataset(dataset, cache_dir)
        return LabelledData(dataset, apply_size(ds.x_train, size, grayscale, "training images"),
                            ds.y_train,
                            apply_size(ds.x_test, size, grayscale, "test images"), ds.y_test,
                            ds.class_names, ds.source)
    if not Path(dataset).exists():
        raise expected(f"a built-in data set in {sorted(DATASETS)} or a path to images",
                       repr(dataset), cls=DataError)
    if is_mvtec(dataset):
        if test_data is not None:
            raise expected("no --test-data with an MVTec AD folder (its test/ folder is the "
                           "test data)", repr(test_data), cls=ConfigError)
        if stream:
            x_train = open_mvtec_train(dataset, image_size=size, grayscale=grayscale)
            mv = MVTecData(x_train, *load_mvtec_test(dataset, x_train.image_shape))
        else:
            mv = load_mvtec(dataset, image_size=size, grayscale=grayscale)
        # Every training image is normal (train/good holds class 0, "good").
        return LabelledData(Path(dataset).name, mv.x_train,
                            np.zeros(len(mv.x_train), np.int64), mv.x_test, mv.classes,
                            mv.class_names, str(Path(dataset).resolve()), mv.masks,
                            mv.has_mask)
    if stream or is_npy_shards(dataset):
        train = open_images(dataset, image_size=size, grayscale=grayscale, skip_bad=skip_bad)
        if not stream:  # shards have no reader of their own: the same images, in memory
            train.images = train.images.load()
    else:
        train = load_folder(dataset, image_size=size, grayscale=grayscale, skip_bad=skip_bad)
    skipped = list(train.skipped)
    check_trainable(train.images)
    if train.labels is not None and len(np.unique(train.labels)) < 2:
        # One class only (e.g. a folder holding just good/): every image is normal, and
        # there is nothing to evaluate on unless --test-data brings anomalies.
        train.labels = train.class_names = None
    x_test = y_test = None
    if test_data is not None:
        shape = train.images.shape[1:]
        test = load_images(test_data, shape=(*shape[:2], shape[2] if len(shape) == 3 else 1),
                           skip_bad=skip_bad)
        skipped += [(f"{test_data}: {f}", why) for f, why in test.skipped]
        if test.labels is None:
            raise expected(f"labels in the test data {test_data} (a 'label' column, a 'y' "
                           "array or class sub-folders)", "unlabelled images", cls=DataError)
        x_test, y_test = test.images, test.labels
    elif train.labels is not None:
        idx = np.random.default_rng(seed).permutation(len(train.images))
        n_test = int(len(idx) * USER_TEST_FRACTION)
        test_idx, train_idx = np.sort(idx[:n_test]), np.sort(idx[n_test:])
        x_test, y_test = train.images[test_idx], train.labels[test_idx]
        train.images, train.labels = train.images[train_idx], train.labels[train_idx]
    return LabelledData(Path(dataset).name, train.images, train.labels, x_test, y_test,
                        train.class_names, str(Path(dataset).resolve()), skipped=skipped)


def _subset(x, y, limit: int | None, seed: int):
    if limit is None or limit >= len(x):
        return x, y
    if limit < 1:
        raise expected("a positive limit", limit, cls=ConfigError)
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
    return x[idx], (y[idx] if y is not None else None)


def prepare(cfg: RunConfig, *, skip_bad: bool = False) -> OneClassSplit:
    """Load the data named by ``cfg`` and split it for one-class training (once per run).

    ``skip_bad``: leave out undecodable files of image folders (``split.skipped``).
    """
    det = cfg.detector
    size = parse_image_size(cfg.image_size)
    stream = choose_stream(cfg.stream, cfg.dataset, builtin=cfg.dataset in DATASETS,
                           image_size=size, grayscale=cfg.grayscale)
    data = load_data(cfg.dataset, test_data=cfg.test_data, cache_dir=cfg.cache_dir,
                     seed=det.seed, image_size=size, grayscale=cfg.grayscale,
                     skip_bad=skip_bad, stream=stream)
    if data.y_train is None:
        normal: tuple[int, ...] = (0,)
        if cfg.calibration_anomalies:
            raise expected("labelled training data for calibration_anomalies",
                           "unlabelled images", cls=ConfigError)
    else:
        n_classes = len(data.class_names) if data.class_names else int(data.y_train.max()) + 1
        normal = parse_classes(cfg.normal_classes, data.class_names, n_classes)
        if data.test_masks is not None and normal != (0,):
            raise expected("--normal-class good (0) for an MVTec AD folder (train/ holds only "
                           "good images)", list(cfg.normal_classes), cls=ConfigError)
    x_test, y_test = (_subset(data.x_test, data.y_test, cfg.test_limit, det.seed + 1)
                      if data.x_test is not None else (None, None))
    masks = has_mask = None
    if data.test_masks is not None:
        # The same seeded subset as the images': _subset's draw, applied to the masks.
        idx = np.arange(len(data.x_test))
        idx, _ = _subset(idx, None, cfg.test_limit, det.seed + 1)
        masks, has_mask = data.test_masks[idx], data.test_has_mask[idx]
    split = split_one_class(data.x_train, data.y_train, x_test, y_test, normal,
                            val_fraction=det.val_fraction, holdout_run=det.holdout_run,
                            calibration_anomalies=cfg.calibration_anomalies,
                            train_limit=cfg.train_limit, seed=det.seed,
                            class_names=data.class_names, dataset=data.name,
                            source=data.source, test_masks=masks, test_has_mask=has_mask)
    split.skipped = data.skipped
    # What is evaluated on, and the few calibration anomalies, are read into memory; only the
    # training images and their hold-out stay on disk.
    if isinstance(split.x_test, DiskImages):
        split.x_test = split.x_test.load()
    if isinstance(split.x_cal_anomalies, DiskImages):
        split.x_cal_anomalies = split.x_cal_anomalies.load()
    if split.y_test is not None and not 0 < split.y_test.sum() < len(split.y_test):
        _log.info("the test data holds only one of normal/anomalous images: AUROC is "
                  "undefined.")
    return split


def load_test_set(artifact: str | Path, metadata: dict, *, dataset: str | None = None,
                  test_data: str | None = None, cache_dir: str | None = None,
                  test_limit: int | None = None, seed: int = 0,
                  image_shape: tuple[int, int, int] | None = None) -> TestSet:
    """The labelled test images an artifact is evaluated on.

    By default the very test split of the run that made it, rebuilt from its ``config.yaml``
    (same data, seed, split and ``--test-data``); with ``dataset``/``test_data``, that data
    set's test images instead, brought to ``image_shape``.
    """
    artifact = Path(artifact)
    normal = tuple(int(c) for c in metadata.get("normal_classes") or (0,))
    source = metadata.get("data_source")
    cfg_path = artifact / "config.yaml"
    if dataset is None and test_data is None and cfg_path.is_file():
        cfg = resolve(cfg_path, {"cache_dir": cache_dir, "test_limit": test_limit})
        if cfg.dataset not in DATASETS and not Path(cfg.dataset).exists() and source:
            cfg.dataset = source  # a relative path from another working directory
        # A fit that skipped bad files recorded it: the same files are skipped again.
        test = prepare(cfg, skip_bad=bool(metadata.get("skip_bad"))).test
        if test is None:
            raise expected("labelled test data (a built-in data set, labelled user images, or "
                           "--test-data PATH)", "none", cls=DataError)
        return test
    name = dataset or metadata.get("dataset")
    if dataset is None and name not in DATASETS and source:
        name = source
    if name is None:
        raise expected("a data set (--dataset NAME or PATH)", "none recorded in the artifact",
                       cls=DataError)
    size = tuple(image_shape[:2]) if image_shape is not None else None
    data = load_data(name, test_data=test_data, cache_dir=cache_dir, seed=seed,
                     image_size=size if data_is_mvtec(name, test_data) else None,
                     skip_bad=bool(metadata.get("skip_bad")))
    if data.x_test is None or data.y_test is None:
        raise expected("labelled test data (a built-in data set, labelled user images, or "
                       "--test-data PATH)", "none", cls=DataError)
    x, classes = data.x_test, np.asarray(data.y_test)
    masks, has_mask = data.test_masks, data.test_has_mask
    if test_limit is not None and test_limit < len(x):
        idx = np.sort(np.random.default_rng(seed + 1).permutation(len(x))[:test_limit])
        x, classes = x[idx], classes[idx]
        if masks is not None:
            masks, has_mask = masks[idx], has_mask[idx]
    y = (~np.isin(classes, normal)).astype(np.int64)
    return TestSet(to_unit_float(x, shape=image_shape, what="test images"), y, classes,
                   data.class_names, data.name, normal, masks, has_mask)


def data_is_mvtec(dataset: str, test_data: str | None = None) -> bool:
    """Whether ``dataset`` names an MVTec AD folder (whose masks must match the model's size,
    so it is read at that size)."""
    return test_data is None and dataset not in DATASETS and is_mvtec(dataset)
