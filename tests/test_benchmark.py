"""anomaly.benchmark's table: the class-mean and its seed spread come from seeds run on every
class; a seed run on some classes only shows in those classes' rows."""

from __future__ import annotations

import pandas as pd

from anomaly.benchmark import markdown
from anomaly.config import resolve


def _rows(seed: int, classes, auroc: float) -> list[dict]:
    return [{"class": c, "name": str(c), "seed": seed, "auroc": auroc + c / 100, "ap": 0.99,
             "fpr@1%": 0.01, "z@1%": 0.0, "fit_s": 10.0, "score_per_s": 1000.0, "epochs": 3}
            for c in classes]


def test_a_seed_on_some_classes_is_left_out_of_the_class_mean():
    df = pd.DataFrame(_rows(0, range(4), 0.90) + _rows(1, range(4), 0.92)
                      + _rows(2, [0], 0.50))  # seed 2 on class 0 only, far below
    md = markdown(df, resolve(None, {"dataset": "mnist"}))
    # Class means of seeds 0 and 1: 0.915 + mean(c / 100) = 0.93; seed 2 would pull it down.
    assert "Mean AUROC 0.9250; std of the 4-class mean across seeds 0.0100" in md
    assert "(per seed: 0: 0.9150, 1: 0.9350)" in md
    assert "seed 2 ran on class(es) 0: in those classes' rows" in md
    # Class 0's row averages all three of its seeds.
    assert "| 0 | 0 | 0.7733 ± 0.1934 |" in md


def test_complete_seeds_give_no_note():
    df = pd.DataFrame(_rows(0, range(3), 0.90) + _rows(1, range(3), 0.90))
    md = markdown(df, resolve(None, {"dataset": "mnist"}))
    assert "ran on class(es)" not in md and "std of the 3-class mean across seeds 0.0000" in md


def test_one_seed_claims_no_spread():
    md = markdown(pd.DataFrame(_rows(0, range(3), 0.90)), resolve(None, {"dataset": "mnist"}))
    assert "Mean AUROC 0.9100; seed 0 (one seed: no spread); worst class 0 0.9000." in md


def test_the_table_says_which_arithmetic_the_runs_trained_in():
    cfg = resolve(None, {"dataset": "mnist"})
    old = pd.DataFrame(_rows(0, range(2), 0.90))  # recorded before the column existed
    assert "training precision=float32;" in markdown(old, cfg)
    mixed = old.assign(precision=["bfloat16", "float32"])
    assert "training precision=bfloat16/float32;" in markdown(mixed, cfg)
