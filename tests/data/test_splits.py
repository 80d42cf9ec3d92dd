"""--normal-class parsing and one-class splits (no test data leaks into training or calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.data.splits import MIN_HOLDOUT_RUNS, holdout, parse_classes, split_one_class
from anomaly.errors import ConfigError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


@pytest.mark.parametrize(("value", "want"), [
    ("0", (0,)),
    (0, (0,)),
    (np.int64(3), (3,)),
    ("0,6", (0, 6)),
    (" 6 , 0 ,6", (0, 6)),
    ("0-2", (0, 1, 2)),
    ("7,0-2", (0, 1, 2, 7)),
    ([6, 0], (0, 6)),
    (["1", "3"], (1, 3)),
])
def test_parse_classes(value, want):
    assert parse_classes(value, n_classes=10) == want


def test_parse_class_names_case_insensitively():
    assert parse_classes("trouser,Bag", FASHION) == (1, 8)
    assert parse_classes("T-shirt/top", FASHION) == (0,)  # a name with '-' is not a range
    assert parse_classes("sneaker,0-1", FASHION) == (0, 1, 7)


@pytest.mark.parametrize(("value", "match"), [
    ("10", r"Expected class indices in 0..9. Received: 10"),
    ("0,10", r"Received: 10"),
    ("-1", r"class indices in 0..9"),
    ("8-12", r"Expected a class range within 0..9. Received: '8-12'"),
    ("0-999999999", r"Expected a class range within 0..9"),  # refused before expanding
    ("cat", r"Expected class indices in 0..9 \(e.g. 0 or 0,6\). Received: 'cat'"),
    ("a-b", r"class indices in 0..9 \(e.g. 0 or 0,6 or 0-2\). Received: 'a-b'"),
    ("", "at least one normal class"),
    (",", "at least one normal class"),
    ([1.5], r"Received: \[1.5\]"),
])
def test_parse_classes_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        parse_classes(value, n_classes=10)


def test_all_classes_normal_is_an_error():
    with pytest.raises(ConfigError, match="at most 9 normal classes so that some are anomalies"):
        parse_classes("0-9", n_classes=10)
    with pytest.raises(ConfigError, match="at most 1 normal classes"):
        parse_classes("a,b", ("a", "b"))
    # ...unless the caller lists classes to run one at a time (the benchmark).
    assert parse_classes("0-9", n_classes=10, leave_anomalies=False) == tuple(range(10))


def test_without_a_class_count_any_non_negative_index_is_accepted():
    assert parse_classes("12") == (12,)
    with pytest.raises(ConfigError, match="non-negative integers"):
        parse_classes("-3")


def _marked(n: int, offset: int) -> np.ndarray:
    """uint8 images whose first two pixels encode a unique id ``offset + i``."""
    x = np.zeros((n, 28, 28), np.uint8)
    ids = np.arange(offset, offset + n)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    return x


def _ids(x: np.ndarray) -> set[int]:
    u = np.rint(x[:, 0, :2] * 255).astype(int) if x.dtype != np.uint8 else x[:, 0, :2].astype(int)
    return set((u[:, 0] * 256 + u[:, 1]).tolist())


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x_train, y_train = _marked(1000, 0), rng.integers(0, 10, 1000)
    x_test, y_test = _marked(300, 5000), rng.integers(0, 10, 300)
    return x_train, y_train, x_test, y_test


def test_split_holds_out_val_fraction_and_never_uses_test_data(data):
    x_train, y_train, x_test, y_test = data
    s = split_one_class(x_train, y_train, x_test, y_test, (0, 6), val_fraction=0.1,
                        calibration_anomalies=20, seed=1)
    normal_ids = set(np.flatnonzero(np.isin(y_train, (0, 6))).tolist())
    test_ids = set(range(5000, 5300))
    train, val, cal = _ids(s.x_train), _ids(s.x_val), _ids(s.x_cal_anomalies)
    assert len(train) == len(s.x_train) and len(val) == len(s.x_val)  # no duplicates
    # Training + validation = exactly the normal training images, disjoint.
    assert train | val == normal_ids and not train & val
    assert len(s.x_val) == round(len(normal_ids) * 0.1)
    # Calibration anomalies: other classes of the training split.
    assert len(cal) == 20 and not cal & normal_ids and cal <= set(range(1000))
    # The test split is only used for evaluation, unchanged and fully labelled.
    assert not (train | val | cal) & test_ids
    assert _ids(s.x_test) == test_ids and len(s.x_test) == 300
    np.testing.assert_array_equal(s.test_classes, y_test)
    np.testing.assert_array_equal(s.y_test, (~np.isin(y_test, (0, 6))).astype(int))
    # uint8 input comes out as float32 in [0, 1].
    for arr in (s.x_train, s.x_val, s.x_test, s.x_cal_anomalies):
        assert arr.dtype == np.float32 and arr.max() <= 1.0


def test_split_is_seeded(data):
    a = split_one_class(*data, (3,), seed=5)
    b = split_one_class(*data, (3,), seed=5)
    c = split_one_class(*data, (3,), seed=6)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert _ids(a.x_val) != _ids(c.x_val)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_val_fraction(data, fraction):
    x_train, y_train, *_ = data
    s = split_one_class(x_train, y_train, None, None, (2,), val_fraction=fraction)
    n = int(np.sum(y_train == 2))
    assert len(s.x_val) == max(1, round(n * fraction))
    assert len(s.x_train) + len(s.x_val) == n
    assert s.x_test is None and s.y_test is None and s.test_classes is None


def test_unlabelled_training_data_is_all_normal():
    x = _marked(50, 0)
    s = split_one_class(x, None, None, None, (0,), val_fraction=0.1)
    assert _ids(s.x_train) | _ids(s.x_val) == set(range(50))
    assert len(s.x_val) == 5
    with pytest.raises(ConfigError, match="labelled training data"):
        split_one_class(x, None, None, None, (0,), calibration_anomalies=5)


@pytest.mark.parametrize("fraction", [0.0, 0.6, -0.1])
def test_bad_val_fraction(data, fraction):
    with pytest.raises(ConfigError, match=r"val_fraction in \(0, 0.5\]"):
        split_one_class(*data, (0,), val_fraction=fraction)


def test_too_few_normal_images_or_no_anomalies():
    x, y = _marked(4, 0), np.array([0, 0, 1, 1])
    with pytest.raises(ConfigError, match=r"at least 4 normal training images\. Received: 2"):
        split_one_class(x, y, None, None, (0,))
    with pytest.raises(ConfigError, match="anomalies in the training split"):
        split_one_class(x, np.zeros(4, int), None, None, (0,), calibration_anomalies=2)


def test_holdout_of_single_images_is_the_seeded_permutation():
    # run=1 must keep the hold-outs (and so the detectors) of before runs existed.
    train, val = holdout(1000, 0.2, 3)
    perm = np.random.default_rng(3).permutation(1000)
    np.testing.assert_array_equal(val, np.sort(perm[:200]))
    np.testing.assert_array_equal(train, np.sort(perm[200:]))


@pytest.mark.parametrize("n,fraction,run", [(5923, 0.2, 100), (1000, 0.2, 20), (997, 0.3, 7)])
def test_holdout_runs_are_consecutive_images(n, fraction, run):
    train, val = holdout(n, fraction, 0, run)
    assert len(val) == max(2, round(n * fraction))
    assert not set(train) & set(val) and len(train) + len(val) == n
    # Every hold-out image lies in a run whose other images are held out too: at most one run
    # (the one cut to size) is partly in training.
    runs = {}
    for i in val:
        runs.setdefault(i // run, []).append(i)
    partial = [k for k, ids in runs.items() if len(ids) < min(run, n - k * run)]
    assert len(partial) <= 1


def test_holdout_runs_shorten_so_a_small_set_is_not_held_out_in_one_stretch():
    # 40 held-out images of 200: runs of 40 // MIN_HOLDOUT_RUNS = 4, not one stretch of 40.
    _, val = holdout(200, 0.2, 0, 100)
    _, counts = np.unique(val // 4, return_counts=True)
    assert len(counts) == MIN_HOLDOUT_RUNS and (counts == 4).all()


def test_holdout_runs_are_seeded_and_vary_with_the_seed():
    np.testing.assert_array_equal(holdout(3000, 0.2, 1, 50)[1], holdout(3000, 0.2, 1, 50)[1])
    assert set(holdout(3000, 0.2, 1, 50)[1]) != set(holdout(3000, 0.2, 2, 50)[1])


@pytest.mark.parametrize("run", [0, -3, 2.5, True, "10"])
def test_bad_holdout_run(run):
    with pytest.raises(ConfigError, match=r"Expected holdout_run as an integer >= 1"):
        holdout(100, 0.2, 0, run)


def test_split_holds_out_runs_of_the_normal_images():
    x = _marked(1000, 0)
    s = split_one_class(x, None, None, None, (0,), val_fraction=0.2, holdout_run=5)
    _, counts = np.unique(np.array(sorted(_ids(s.x_val))) // 5, return_counts=True)
    assert len(counts) == 40 and (counts == 5).all()
