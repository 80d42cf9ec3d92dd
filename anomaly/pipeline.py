"""The training pipeline: config -> data -> fit -> calibrate -> evaluate -> artifact.

Each step lives in its own module; this one only wires them together for ``anomaly fit`` and
``anomaly evaluate`` and reports progress on stderr.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.artifact import check_name, new_version
from anomaly.config import RunConfig
from anomaly.data.builtin import DATASETS, load_dataset
from anomaly.data.images import load_images
from anomaly.data.splits import OneClassSplit, parse_classes, split_one_class
from anomaly.errors import ConfigError, DataError, expected


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class LabelledData:
    """Training and (optional) test images with labels.

    Images are ``(N, 28, 28)``: uint8 for the built-in sets, float32 in [0, 1] otherwise.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: tuple[str, ...] | None
    source: str


def _subset(x, y, limit: int | None, seed: int):
    if limit is None or limit >= len(x):
        return x, y
    if limit < 1:
        raise expected("a positive limit", limit, cls=ConfigError)
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
    return x[idx], (y[idx] if y is not None else None)


def load_data(dataset: str, *, test_data: str | None = None, cache_dir: str | None = None,
              seed: int = 0) -> LabelledData:
    """A built-in data set by name, or a user's images (file or folder) by path.

    User data with labels of two or more classes and no ``test_data`` is split 80/20 (by
    shuffling with ``seed``) into training and test parts; unlabelled or single-class user data
    is all normal training data.
    """
    if dataset in DATASETS:
        ds = load_dataset(dataset, cache_dir)
        return LabelledData(dataset, ds.x_train, ds.y_train, ds.x_test, ds.y_test,
                            ds.class_names, ds.source)
    if not Path(dataset).exists():
        raise expected(f"a built-in data set in {sorted(DATASETS)} or a path to images",
                       repr(dataset), cls=DataError)
    train = load_images(dataset)
    if train.labels is not None and len(np.unique(train.labels)) < 2:
        # One class only (e.g. a folder holding just good/): every image is normal, and
        # there is nothing to evaluate on unless --test-data brings anomalies.
        train.labels = train.class_names = None
    x_test = y_test = None
    if test_data is not None:
        test = load_images(test_data)
        if test.labels is None:
            raise expected(f"labels in the test data {test_data} (a 'label' column, a 'y' "
                           "array or class sub-folders)", "unlabelled images", cls=DataError)
        x_test, y_test = test.images, test.labels
    elif train.labels is not None:
        idx = np.random.default_rng(seed).permutation(len(train.images))
        n_test = len(idx) // 5
        test_idx, train_idx = np.sort(idx[:n_test]), np.sort(idx[n_test:])
        x_test, y_test = train.images[test_idx], train.labels[test_idx]
        train.images, train.labels = train.images[train_idx], train.labels[train_idx]
    return LabelledData(Path(dataset).name, train.images, train.labels, x_test, y_test,
                        train.class_names, str(Path(dataset).resolve()))


def default_name(data_name: str, normal_classes: tuple[int, ...], model: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in data_name).strip("-.")
    return f"{slug or 'data'}-{'_'.join(map(str, normal_classes))}-{model}"


def epochs_run(history: dict) -> int:
    """Epochs trained in all, counting those restored by a resumed run."""
    return int(history["epoch"][-1]) if history.get("epoch") else len(history.get("loss", []))


@dataclass
class FitResult:
    path: Path
    detector: object
    evaluation: object | None
    timings: dict[str, float]


def prepare(cfg: RunConfig) -> tuple[LabelledData, tuple[int, ...], OneClassSplit]:
    """Load the data named by ``cfg`` and split it for one-class training."""
    data = load_data(cfg.dataset, test_data=cfg.test_data, cache_dir=cfg.cache_dir,
                     seed=cfg.seed)
    if data.y_train is None:
        normal: tuple[int, ...] = (0,)
        if cfg.calibration_anomalies:
            raise expected("labelled training data for calibration_anomalies",
                           "unlabelled images", cls=ConfigError)
    else:
        n_classes = len(data.class_names) if data.class_names else int(data.y_train.max()) + 1
        normal = parse_classes(cfg.normal_classes, data.class_names, n_classes)
    x_train, y_train = _subset(data.x_train, data.y_train, cfg.train_limit, cfg.seed)
    x_test, y_test = (_subset(data.x_test, data.y_test, cfg.test_limit, cfg.seed + 1)
                      if data.x_test is not None else (None, None))
    split = split_one_class(x_train, y_train, x_test, y_test, normal,
                            val_fraction=cfg.val_fraction,
                            calibration_anomalies=cfg.calibration_anomalies, seed=cfg.seed)
    if split.y_test is not None and not 0 < split.y_test.sum() < len(split.y_test):
        log("note: the test data holds only one of normal/anomalous images: AUROC is undefined.")
    return data, normal, split


def run_fit(cfg: RunConfig, *, verbose: int = 1) -> FitResult:
    """Train, calibrate, evaluate and save one detector as described by ``cfg``."""
    from anomaly.detector import Detector
    from anomaly.evaluation import evaluate

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    detector = Detector(**cfg.detector_params())
    detector.check_params()  # a bad --model or value fails before the data is loaded
    if cfg.default_operating_point in ("f1-max", "youden") and not cfg.calibration_anomalies:
        raise expected(f"--calibration-anomalies N for the '{cfg.default_operating_point}' "
                       "operating point", "none", cls=ConfigError)
    data, normal, split = prepare(cfg)
    name = check_name(cfg.name or default_name(data.name, normal, cfg.model))
    root = Path(cfg.output)
    timings["data_s"] = time.perf_counter() - t0
    log(f"Training {cfg.model} on {len(split.x_train)} normal images of {data.name} "
        f"(classes {list(normal)}), validating on {len(split.x_val)}.")
    # A killed run resumes from the state saved for the same configuration.
    run_key = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]
    backup_dir = root / name / f".resume-{run_key}"
    if backup_dir.exists():
        log(f"Resuming from the state in {backup_dir}")
    t = time.perf_counter()
    detector.fit(split.x_train, split.x_val, calibration_anomalies=split.x_cal_anomalies,
                 backup_dir=backup_dir, verbose=verbose, distribute=cfg.distribute)
    timings["fit_s"] = time.perf_counter() - t
    ev = None
    if split.x_test is not None:
        t = time.perf_counter()
        ev = evaluate(detector.score(split.x_test), split.y_test, detector.calibration_,
                      split.test_classes, data.class_names)
        timings["evaluate_s"] = time.perf_counter() - t
    from anomaly.training import is_chief

    if not is_chief():
        log("Not the chief worker of the TF_CONFIG cluster: the chief writes the artifact.")
        return FitResult(None, detector, ev, timings)
    version = new_version()
    path = root / name / version
    n = 1
    while path.exists():
        n += 1
        path = root / name / f"{version}-{n}"
    t = time.perf_counter()
    metadata = {
        "name": name,
        "version": path.name,
        "dataset": data.name,
        "data_source": data.source,
        "normal_classes": list(normal),
        "class_names": list(data.class_names) if data.class_names else None,
        "n_train": len(split.x_train),
        "n_val": len(split.x_val),
        "epochs_run": epochs_run(detector.history_),
        "distribute": detector.strategy_,
    }
    detector.save(path, metadata=metadata, metrics=ev.metrics if ev else None,
                  per_class=ev.per_class if ev else None, config_yaml=cfg.to_yaml())
    shutil.rmtree(backup_dir, ignore_errors=True)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return FitResult(path, detector, ev, timings)


@dataclass
class TestSet:
    """Labelled test images for a report.

    Attributes:
        x: ``(N, 28, 28)`` float32 in [0, 1].
        y: ``(N,)`` 1 = anomaly, 0 = normal.
        classes: ``(N,)`` original class of each image.
        class_names: names of the classes where known.
        dataset: the data set's name; ``normal_classes`` the artifact's normal classes.
    """

    x: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...] | None
    dataset: str
    normal_classes: tuple[int, ...]


def load_test_set(artifact: str | Path, metadata: dict, *, dataset: str | None = None,
                  test_data: str | None = None, cache_dir: str | None = None,
                  test_limit: int | None = None, seed: int = 0) -> TestSet:
    """The labelled test images an artifact is evaluated on.

    By default the very test split of the run that made it, rebuilt from its ``config.yaml``
    (same data, seed, split and ``--test-data``), so no training image can be scored as a test
    image; with ``dataset``/``test_data``, that data set's test images instead.
    """
    from anomaly.config import resolve
    from anomaly.data.images import to_unit_float

    artifact = Path(artifact)
    normal = tuple(int(c) for c in metadata.get("normal_classes") or (0,))
    source = metadata.get("data_source")
    cfg_path = artifact / "config.yaml"
    if dataset is None and test_data is None and cfg_path.is_file():
        cfg = resolve(cfg_path, {"cache_dir": cache_dir, "test_limit": test_limit})
        if cfg.dataset not in DATASETS and not Path(cfg.dataset).exists() and source:
            cfg.dataset = source  # a relative path from another working directory
        data, normal, split = prepare(cfg)
        if split.x_test is None:
            raise expected("labelled test data for the report (a built-in data set, labelled "
                           "user images, or --test-data PATH)", "none", cls=DataError)
        return TestSet(split.x_test, split.y_test, np.asarray(split.test_classes),
                       data.class_names, data.name, tuple(normal))
    name = dataset or metadata.get("dataset")
    if dataset is None and name not in DATASETS and source:
        name = source
    if name is None:
        raise expected("a data set for the report (--dataset NAME or PATH)",
                       "none recorded in the artifact", cls=DataError)
    data = load_data(name, test_data=test_data, cache_dir=cache_dir, seed=seed)
    if data.x_test is None or data.y_test is None:
        raise expected("labelled test data for the report (a built-in data set, labelled "
                       "user images, or --test-data PATH)", "none", cls=DataError)
    x, classes = data.x_test, np.asarray(data.y_test)
    if test_limit is not None and test_limit < len(x):
        idx = np.sort(np.random.default_rng(seed + 1).permutation(len(x))[:test_limit])
        x, classes = x[idx], classes[idx]
    y = (~np.isin(classes, normal)).astype(np.int64)
    return TestSet(to_unit_float(x, what="test images"), y, classes, data.class_names,
                   data.name, normal)


def run_evaluate(artifact: str | Path, *, dataset: str | None = None,
                 test_data: str | None = None, cache_dir: str | None = None,
                 test_limit: int | None = None):
    """Evaluate a saved artifact on its run's test split (or another data set's)."""
    from anomaly.detector import Detector
    from anomaly.evaluation import evaluate

    det = Detector.load(artifact)
    test = load_test_set(artifact, det.metadata_, dataset=dataset, test_data=test_data,
                         cache_dir=cache_dir, test_limit=test_limit, seed=det.seed)
    scores = det.score(test.x)
    return det, evaluate(scores, test.y, det.calibration_, test.classes, test.class_names)
