"""Data: the built-in data sets, users' own image files, and normal/anomaly splits."""

from anomaly.data.builtin import DATASETS, Dataset, default_cache_dir, load_dataset
from anomaly.data.images import load_images, to_unit_float
from anomaly.data.splits import OneClassSplit, parse_classes, split_one_class
from anomaly.data.stream import DiskImages, open_images

__all__ = [
    "DATASETS",
    "Dataset",
    "DiskImages",
    "OneClassSplit",
    "default_cache_dir",
    "load_dataset",
    "load_images",
    "open_images",
    "parse_classes",
    "split_one_class",
    "to_unit_float",
]
