"""The ``anomaly`` CLI in-process: every bad input is one ``error:`` line and exit status 2.

The happy paths run here on tiny synthetic data; tests/test_e2e.py runs the real command on
real MNIST.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from anomaly.cli import main
from anomaly.detector import Detector
from tests.conftest import error_line, make_bars, make_blobs


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(capsys, argv, *fragments: str, code: int = 2) -> str:
    """Run ``argv``; expect exit ``code`` (2 usage, 1 runtime error) and one ``error:`` line
    holding every fragment."""
    try:
        rc, _, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse's usage errors exit from the parser
        rc, err = exc.code, capsys.readouterr().err
    assert rc == code, err
    line = error_line(err)
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture
def files(tmp_path):
    """Bad and good input files for ``anomaly score``."""
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "good.npy", make_blobs(6, seed=3))
    nan = make_blobs(3, seed=3)
    nan[1, 2, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "shape.npy", np.zeros((3, 5), np.float32))
    (d / "garbage.npy").write_bytes(b"this is not an array")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    pd.DataFrame(np.zeros((2, 100))).to_csv(d / "short.csv", index=False)
    return d


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture
def ten_classes(tmp_path):
    """A labelled .npz with classes 0..9, like MNIST (tests/test_e2e.py uses MNIST itself)."""
    path = tmp_path / "ten.npz"
    np.savez(path, x=make_blobs(40, seed=2), y=np.arange(40) % 10)
    return path


def test_unknown_class(capsys, tmp_path, ten_classes):
    out = tmp_path / "models"
    assert_error(capsys, ["fit", "--dataset", ten_classes, "--normal-class", "10", "--output",
                          out], "Expected class indices in 0..9", "Received: 10")
    assert not out.exists()  # nothing trained, nothing written


def test_all_classes_normal(capsys, tmp_path, ten_classes):
    assert_error(capsys, ["fit", "--dataset", ten_classes, "--normal-class", "0-9", "--output",
                          tmp_path / "models"],
                 "Expected at most 9 normal classes", "Received: [0, 1,")


def test_unknown_dataset(capsys, tmp_path):
    assert_error(capsys, ["fit", "--dataset", "mnits", "--output", tmp_path],
                 "Expected a built-in data set in ['fashion-mnist', 'mnist'] or a path",
                 "Received: 'mnits'", code=1)
    assert_error(capsys, ["data", "fetch", "--dataset", "cifar"],
                 "Expected a data set in ['fashion-mnist', 'mnist'] or 'all'",
                 "Received: 'cifar'")


def test_unknown_model_fails_before_loading_data(capsys, tmp_path):
    rc, out, err = run(capsys, "fit", "--model", "gan", "--output", tmp_path)
    assert rc == 2
    line = error_line(err)
    assert "Expected a model in ['affine-vae', 'conv-ae', 'conv-vae', 'dense-ae', 'vae']" in line
    assert "Received: 'gan'" in line and "anomaly models --available" in line
    assert err.strip() == line  # no "Training gan on ..." line before it
    assert out == ""


@pytest.mark.parametrize(("argv", "fragments"), [
    # Each integer flag states its own minimum, the one check_params enforces.
    (["--epochs", "0"], ["argument --epochs", "expected an integer >= 1. Received: '0'"]),
    (["--epochs", "many"], ["expected an integer >= 1. Received: 'many'"]),
    (["--patience", "-1"], ["argument --patience", "expected an integer >= 0. Received: '-1'"]),
    (["--train-limit", "0"], ["argument --train-limit", "an integer >= 1. Received: '0'"]),
    (["--target-fpr", "lots"], ["expected FPRs like 0.01,0.05 or 1%,5%. Received: 'lots'"]),
    (["--beta", "nan"], ["expected a finite number. Received: 'nan'"]),
    (["--hidden", "32,x"], ["comma-separated integers like 32,64. Received: '32,x'"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
])
def test_bad_flags(capsys, argv, fragments):
    line = assert_error(capsys, ["fit", *argv], *fragments)
    assert "--help" in line  # and where to read about the flags


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epoch: 3\n")
    assert_error(capsys, ["fit", "--config", cfg], "Received: 'epoch'", "Did you mean 'epochs'?")
    cfg.write_text("knn_k: 0\n")
    assert_error(capsys, ["fit", "--config", cfg], "Expected 'knn_k' as an integer >= 1",
                 "Received: 0")
    cfg.write_text("epochs: three\n")
    assert_error(capsys, ["fit", "--config", cfg], "Expected 'epochs' as int",
                 "Received: 'three' (str)")
    assert_error(capsys, ["fit", "--config", tmp_path / "none.yaml"],
                 "Expected an existing config file", "(not found)")


@pytest.mark.parametrize(("name", "fragments"), [
    ("garbage.npy", ["Expected a .npy/.npz file of numeric arrays", "garbage.npy"]),
    ("shape.npy", ["as flattened rows of 784 values per row", "Received: shape (3, 5)"]),
    ("nan.npy", ["Expected finite pixel values", "Received: NaN or Inf in image 1"]),
    ("corrupt.png", ["to be a PNG, JPEG or other image file", "Received: undecodable bytes"]),
    ("short.csv", ["784 pixel columns", "Received: 100 pixel columns"]),
    ("missing.npy", ["Expected an existing file or folder of images", "(not found)"]),
])
def test_bad_score_input(capsys, saved_artifact, files, tmp_path, name, fragments):
    out = tmp_path / "scores.csv"
    assert_error(capsys, ["score", saved_artifact, "--input", files / name, "--output", out],
                 *fragments, code=1)
    assert not out.exists()


def test_nan_in_training_data(capsys, files, tmp_path):
    assert_error(capsys, ["fit", "--dataset", files / "nan.npy", "--output", tmp_path / "m"],
                 "Expected finite pixel values", "Received: NaN or Inf in image 1", code=1)


def test_missing_artifact(capsys, files, tmp_path):
    for argv in (["score", tmp_path / "nope", "--input", files / "good.npy", "--output",
                  tmp_path / "s.csv"], ["evaluate", tmp_path / "nope"]):
        assert_error(capsys, argv, "Expected an artifact directory", "(not found)", code=1)
    assert_error(capsys, ["models", tmp_path / "nope"], "Expected a models directory", code=1)


def test_tampered_artifact(capsys, artifact_copy, files, tmp_path):
    data = bytearray((artifact_copy / "model.keras").read_bytes())
    data[100] ^= 0xFF
    (artifact_copy / "model.keras").write_bytes(bytes(data))
    line = assert_error(capsys, ["score", artifact_copy, "--input", files / "good.npy",
                                 "--output", tmp_path / "s.csv"],
                        "Expected model.keras with SHA-256", "Received:", "modified or damaged",
                        code=1)
    assert str(artifact_copy) in line


def test_incomplete_artifact(capsys, artifact_copy, files, tmp_path):
    (artifact_copy / "manifest.json").unlink()
    assert_error(capsys, ["score", artifact_copy, "--input", files / "good.npy", "--output",
                          tmp_path / "s.csv"],
                 "Expected manifest.json in the artifact", "Received: no manifest", code=1)


def test_unknown_operating_point_and_bad_output(capsys, saved_artifact, files, tmp_path):
    assert_error(capsys, ["score", saved_artifact, "--input", files / "good.npy", "--output",
                          tmp_path / "s.csv", "--operating-point", "f1-max"],
                 "Expected an operating point in ['fpr@1%']", "Received: 'f1-max'", code=1)
    assert_error(capsys, ["score", saved_artifact, "--input", files / "good.npy", "--output",
                          tmp_path / "s.json"], "an --output path ending in .csv")


# -- happy paths on synthetic data ------------------------------------------------------------


def test_score_npy(capsys, saved_artifact, files, tmp_path):
    out = tmp_path / "scores.csv"
    rc, stdout, _ = run(capsys, "score", saved_artifact, "--input", files / "good.npy",
                        "--output", out)
    assert rc == 0 and "Scored 6 images" in stdout and "fpr@1%" in stdout
    df = pd.read_csv(out)
    assert df.columns.tolist() == ["id", "score", "normalized_score", "is_anomaly"]
    det = Detector.load(saved_artifact)
    d = det.detect(np.load(files / "good.npy"))
    np.testing.assert_allclose(df["score"], d.scores, rtol=1e-12)
    np.testing.assert_array_equal(df["normalized_score"], d.normalized)
    np.testing.assert_array_equal(df["is_anomaly"], d.is_anomaly)
    assert df["id"].tolist() == list(range(6))


def test_score_csv_takes_the_runtime(capsys, saved_artifact, files, tmp_path):
    """A CSV is scored by anomaly.runtime's loader: Keras where TensorFlow is (above), the
    ONNX export where asked (or where TensorFlow is not: tests/service/test_light_install.py),
    and an artifact without one says how to export it."""
    out = tmp_path / "scores.csv"
    assert_error(capsys, ["score", saved_artifact, "--input", files / "good.npy", "--output",
                          out, "--runtime", "onnx"], "Expected an artifact exported to ONNX",
                 "anomaly export", code=1)
    assert not out.exists()
    rc, _, err = run(capsys, "score", saved_artifact, "--input", files / "good.npy",
                     "--output", out, "--runtime", "keras")
    assert rc == 0, err
    assert len(pd.read_csv(out)) == 6


def test_score_folder_with_labels(capsys, saved_artifact, tmp_path):
    folder = tmp_path / "pngs"
    for cls, imgs in (("blob", make_blobs(3, seed=4)), ("bar", make_bars(2, seed=4))):
        (folder / cls).mkdir(parents=True)
        for i, img in enumerate(imgs):
            Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / cls / f"{i}.png")
    out = tmp_path / "scores.csv"
    assert run(capsys, "score", saved_artifact, "--input", folder, "--output", out)[0] == 0
    df = pd.read_csv(out)
    assert df["id"].tolist() == ["bar/0.png", "bar/1.png", "blob/0.png", "blob/1.png",
                                 "blob/2.png"]
    assert df["label"].tolist() == [0, 0, 1, 1, 1]  # sorted folder names: bar=0, blob=1
    assert df["is_anomaly"].tolist()[:2] == [True, True]
    assert df["normalized_score"].between(0, 1).all()


def test_fit_and_evaluate_user_data(capsys, tmp_path):
    """fit/evaluate on a labelled .npz: blobs are class 0 (normal), bars class 1."""
    x = np.concatenate([make_blobs(200, seed=5), make_bars(50, seed=5)])
    y = np.r_[np.zeros(200, int), np.ones(50, int)]
    np.savez(tmp_path / "shapes.npz", x=x, y=y)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: dense-ae\nhidden: [16]\nlatent_dim: 2\nepochs: 3\nbatch_size: 32\n"
                   "score: mse\naggregation: mean\ntarget_fprs: [0.01]\n")
    rc, out, err = run(capsys, "fit", "--force-calibration", "--dataset", tmp_path / "shapes.npz", "--normal-class", "0",
                       "--config", cfg, "--epochs", "1", "--output", tmp_path / "models",
                       "--name", "shapes", "--calibration-anomalies", "10")
    assert rc == 0, err
    assert "Training dense-ae on" in err
    path = next((tmp_path / "models" / "shapes").iterdir())
    assert f"Artifact: {path}" in out and "AUROC" in out and "1 epochs" in out
    metrics = json.loads((path / "metrics.json").read_text())
    # 80/20 split of the labelled file: 50 test images, about a fifth of them bars.
    assert metrics["n_test"] == 50 and 0 < metrics["n_anomalies"] < 50
    assert metrics["auroc"] > 0.9
    # Labelled calibration anomalies (from the training part) add the f1-max and youden points.
    assert set(metrics["operating_points"]) == {"fpr@1%", "f1-max", "youden"}
    calibration = json.loads((path / "calibration.json").read_text())
    assert calibration["default"] == "fpr@1%"
    assert calibration["operating_points"]["f1-max"]["expected_tpr"] is not None
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["dataset"] == "shapes.npz" and meta["normal_classes"] == [0]
    assert meta["epochs_run"] == 1
    assert "epochs: 1" in (path / "config.yaml").read_text()  # the flag overrode the YAML
    assert pd.read_csv(path / "per_class.csv")["role"].tolist() == ["normal", "anomaly"]
    assert not [p for p in (tmp_path / "models" / "shapes").iterdir() if p.name.startswith(".")]

    rc, out, _ = run(capsys, "evaluate", path, "--output", tmp_path / "m.json")
    assert rc == 0 and "AUROC" in out
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["auroc"] == pytest.approx(metrics["auroc"], abs=1e-9)

    rc, out, _ = run(capsys, "models", tmp_path / "models")
    assert rc == 0 and "shapes" in out and "dense-ae" in out and f"{metrics['auroc']:.4f}" in out


def test_models_lists_available_types(capsys, tmp_path):
    rc, out, _ = run(capsys, "models", "--available")
    assert rc == 0
    for name in ("dense-ae", "conv-ae", "vae", "conv-vae", "affine-vae"):
        assert name in out
    rc, out, _ = run(capsys, "models", tmp_path)
    assert rc == 0 and "No artifacts" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "anomaly 0.1.0" in capsys.readouterr().out


def test_benchmark_on_user_data(capsys, tmp_path):
    # Class 0 is the blobs; classes 1-9 share the bars, so class 0 is easy to tell apart.
    x = np.concatenate([make_blobs(100, seed=6), make_bars(100, seed=6)])
    y = np.r_[np.zeros(100, int), 1 + np.arange(100) % 9]
    np.savez(tmp_path / "ten.npz", x=x, y=y)
    rc, out, err = run(capsys, "benchmark", "--force-calibration", "--dataset", tmp_path / "ten.npz", "--classes", "0,3",
                       "--model", "dense-ae", "--score", "mse+knn", "--aggregation", "mean", "--hidden", "16", "--latent-dim", "2", "--epochs",
                       "3", "--baselines", "--seeds", "0,1", "--output", tmp_path / "bench")
    assert rc == 0, err
    table = pd.read_csv(tmp_path / "bench" / "ten.npz-dense-ae.csv")
    assert table["class"].tolist() == [0, 0, 3, 3] and table["seed"].tolist() == [0, 1, 0, 1]
    assert {"fpr@1%", "z@1%", "fpr@5%", "z@5%", "score_per_s"} <= set(table.columns)
    blobs = table[table["class"] == 0].mean(numeric_only=True)
    assert blobs["pca_auroc"] > 0.9 and blobs["auroc"] > 0.75  # bars are far from every blob
    assert (table["auroc"] - table["pca_auroc"]).abs().max() > 0  # two methods, two columns
    assert (table["epochs"] == 3).all()
    md = (tmp_path / "bench" / "ten.npz-dense-ae.md").read_text()
    assert "| **mean** |" in md and md in out and "std of the 2-class mean across seeds" in md


def test_fit_with_the_accurate_preset(capsys, tmp_path):
    """--preset accurate trains longer; the artifact's config says so and a flag still
    overrides a value the preset sets."""
    from anomaly.config import PRESETS

    x = np.concatenate([make_blobs(200, seed=5), make_bars(50, seed=5)])
    y = np.r_[np.zeros(200, int), np.ones(50, int)]
    np.savez(tmp_path / "shapes.npz", x=x, y=y)
    common = ("--force-calibration", "--dataset", tmp_path / "shapes.npz", "--model", "dense-ae",
              "--hidden", "16", "--latent-dim", "2", "--output", tmp_path / "m",
              "--no-report", "--quiet")
    # The preset's 30 epochs of 160 images: a second or two.
    rc, _, err = run(capsys, "fit", *common, "--preset", "accurate", "--name", "a")
    assert rc == 0, err
    path = next((tmp_path / "m" / "a").iterdir())
    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["preset"] == "accurate" and config["score"] == "mse+knn+tp"
    assert config["epochs"] == PRESETS["accurate"]["epochs"]
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["auroc"] > 0.5
    rc, _, err = run(capsys, "fit", *common, "--preset", "accurate", "--epochs", "1",
                     "--name", "b")
    assert rc == 0, err
    path = next((tmp_path / "m" / "b").iterdir())
    assert yaml.safe_load((path / "config.yaml").read_text())["epochs"] == 1
    rc, _, err = run(capsys, "fit", *common, "--preset", "turbo", "--name", "c")
    assert rc != 0
    assert error_line(err) == "error: Expected a preset in ['accurate', 'fast']. Received: 'turbo'"
    assert not (tmp_path / "m" / "c").exists()


def test_evaluate_rebuilds_the_runs_own_test_split(capsys, tmp_path):
    """evaluate scores exactly the fit's test images (same seed and split), never training ones."""
    x = np.concatenate([make_blobs(200, seed=5), make_bars(50, seed=5)])
    y = np.r_[np.zeros(200, int), np.ones(50, int)]
    np.savez(tmp_path / "shapes.npz", x=x, y=y)
    rc, _, err = run(capsys, "fit", "--force-calibration", "--dataset", tmp_path / "shapes.npz", "--model", "dense-ae",
                     "--hidden", "16", "--latent-dim", "2", "--epochs", "1", "--seed", "3",
                     "--output", tmp_path / "m", "--name", "s", "--no-report", "--quiet")
    assert rc == 0, err
    path = next((tmp_path / "m" / "s").iterdir())
    rc, _, err = run(capsys, "evaluate", path, "--output", tmp_path / "e.json")
    assert rc == 0, err
    again = json.loads((tmp_path / "e.json").read_text())
    saved = json.loads((path / "metrics.json").read_text())
    assert again["n_test"] == saved["n_test"] == 50
    assert again["auroc"] == pytest.approx(saved["auroc"])
    for name, point in saved["operating_points"].items():
        numbers = {k: v for k, v in point.items() if isinstance(v, int | float)}
        assert {k: again["operating_points"][name][k] for k in numbers} == pytest.approx(numbers)
        assert again["operating_points"][name]["fpr_check"] == point["fpr_check"]
        assert again["operating_points"][name]["fpr_interval"] == pytest.approx(
            point["fpr_interval"])


def test_single_class_folder_trains_without_evaluation(capsys, tmp_path):
    """A folder holding only good/ images: every image is normal, nothing to evaluate on."""
    good = tmp_path / "imgs" / "good"
    good.mkdir(parents=True)
    for i, img in enumerate(make_blobs(30, seed=2)):
        Image.fromarray((img * 255).astype(np.uint8)).save(good / f"{i}.png")
    rc, out, err = run(capsys, "fit", "--force-calibration", "--dataset", tmp_path / "imgs", "--normal-class", "good",
                       "--model", "dense-ae", "--hidden", "16", "--latent-dim", "2",
                       "--epochs", "1", "--output", tmp_path / "m", "--quiet")
    assert rc == 0, err
    assert "Artifact:" in out and "AUROC" not in out
    path = next((tmp_path / "m").glob("imgs-0-dense-ae/*"))
    assert not (path / "metrics.json").exists()


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--target-fpr", "2"], ["Expected target FPRs in (0, 1)", "Received: [2.0]"]),
    (["--default-operating-point", "f1-max"], ["--calibration-anomalies N for the 'f1-max'"]),
    (["--default-operating-point", "fpr@3%"], ["Expected a default operating point in"]),
    (["--stream", "sometimes"], ["Expected 'stream' in ('auto', 'always', 'never')",
                                 "Received: 'sometimes'"]),
])
def test_bad_settings_fail_before_any_data_or_training(capsys, argv, fragments, tmp_path):
    line = assert_error(capsys, ["fit", "--dataset", tmp_path / "absent.npz", *argv], *fragments)
    assert "absent.npz" not in line  # refused before the data set was even looked at


def test_paths_of_the_wrong_kind_are_one_error_line(capsys, tmp_path, saved_artifact):
    np.save(tmp_path / "x.npy", make_blobs(3))
    assert_error(capsys, ["score", saved_artifact, "--input", tmp_path / "x.npy",
                          "--output", tmp_path / "x.parquet"], "an --output path ending in .csv",
                 "x.parquet")
    # A folder is an output folder for parts: one holding other files is refused untouched.
    assert_error(capsys, ["score", saved_artifact, "--input", tmp_path / "x.npy",
                          "--output", tmp_path], "an output folder that is empty or holds "
                 "this same run", "(not empty, and no _run.json)")
    (tmp_path / "taken.csv").mkdir()
    assert_error(capsys, ["score", saved_artifact, "--input", tmp_path / "x.npy",
                          "--output", tmp_path / "taken.csv"], "Expected a readable/writable path",
                 "taken.csv", code=1)
    assert_error(capsys, ["fit", "--config", tmp_path], "Expected a config file",
                 "(a folder)")
    assert_error(capsys, ["models", tmp_path / "x.npy"], "(not a folder)", code=1)


def test_calibrate_writes_a_new_verified_version_with_its_lineage(capsys, saved_artifact,
                                                                  tmp_path):
    """New operating points from new data, the same weights; thresholds move only when the
    data do."""
    models = tmp_path / "models"
    shutil.copytree(saved_artifact.parent, models / "blobs")
    parent = models / "blobs" / "1"
    np.save(tmp_path / "normal.npy", make_blobs(120, seed=21))
    np.save(tmp_path / "other.npy", make_blobs(120, seed=22))
    np.save(tmp_path / "bars.npy", make_bars(30, seed=21))
    versions = []
    for normal in ("normal.npy", "normal.npy", "other.npy"):
        rc, out, err = run(capsys, "calibrate", parent, "--normal", tmp_path / normal,
                           "--force-calibration")
        assert rc == 0, err
        versions.append(Path(out.split(": ", 1)[1].splitlines()[0]))
    assert len({v.name for v in versions}) == 3 and all(v.parent == parent.parent
                                                        for v in versions)
    dets = [Detector.load(v) for v in versions]  # each verifies against its manifest
    thresholds = [d.calibration_.get("fpr@1%").threshold for d in dets]
    assert thresholds[0] == thresholds[1] != thresholds[2]
    lineage = dets[0].metadata_["lineage"]
    assert lineage["parent"]["version"] == "1" and lineage["n_reference"]["after"] == 120
    assert lineage["data"][0]["path"].endswith("normal.npy")
    original = Detector.load(parent)
    x = make_blobs(5, seed=30)
    np.testing.assert_array_equal(dets[0].decision_function(x), original.decision_function(x))

    rc, out, err = run(capsys, "calibrate", parent, "--normal", tmp_path / "normal.npy",
                       "--anomalies", tmp_path / "bars.npy", "--force-calibration")
    assert rc == 0, err
    assert "f1-max" in out and "youden" in out
    assert_error(capsys, ["calibrate", parent], "Expected normal images to calibrate on",
                 code=1)


# -- conventions: help, streams, verbosity, exit codes ----------------------------------------


def _all_parsers():
    """Every (sub)command's parser, by its prog name."""
    import argparse

    from anomaly.cli import build_parser

    todo, out = [build_parser()], {}
    while todo:
        p = todo.pop()
        out[p.prog] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return out


def test_help_shows_a_default_for_every_option_and_help_for_every_positional():
    import argparse

    parsers = _all_parsers()
    assert {"anomaly fit", "anomaly score", "anomaly data sample", "anomaly serve"} <= set(parsers)
    missing = []
    for prog, p in parsers.items():
        p.format_help()  # renders ('%' in a help string would raise here)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction | argparse._HelpAction |
                          argparse._VersionAction):
                continue
            text = a.help or ""
            if not a.option_strings:
                ok = bool(text.strip())
            elif a.required:
                ok = "(required)" in text
            else:
                ok = "default" in text
            if not ok:
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}: {text!r}")
    assert not missing, "\n".join(missing)
    # -q/-v reach every command, nested ones included
    leaves = [p for prog, p in parsers.items() if prog not in ("anomaly", "anomaly data")]
    assert all({"-q", "-v"} <= set(p._option_string_actions) for p in leaves)


@pytest.fixture
def shapes(tmp_path):
    """A labelled .npz: 200 blobs (class 0, normal) and 50 bars (class 1)."""
    x = np.concatenate([make_blobs(200, seed=5), make_bars(50, seed=5)])
    np.savez(tmp_path / "shapes.npz", x=x, y=np.r_[np.zeros(200, int), np.ones(50, int)])
    return tmp_path / "shapes.npz"


_TINY_FIT = ("--model", "dense-ae", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
             "--force-calibration", "--no-report")


def test_json_results_are_alone_on_stdout(capsys, tmp_path, shapes, saved_artifact):
    models = tmp_path / "models"
    rc, out, err = run(capsys, "fit", "--dataset", shapes, *_TINY_FIT, "--output", models,
                       "--name", "s", "--json")
    assert rc == 0, err
    fit = json.loads(out)  # the whole of stdout is one document
    path = Path(fit["artifact"])
    assert path.parent == models / "s" and fit["epochs"] == 1
    assert fit["metrics"]["n_test"] == 50 and fit["skipped"] == []
    t = fit["timings"]
    parts = ("startup_s", "data_s", "train_s", "calibrate_s", "evaluate_s", "save_s")
    assert all(t[k] >= 0 for k in parts)
    assert sum(t[k] for k in parts) <= t["wall_s"] + 0.5  # parts of the wall time, not more
    assert t["train_s"] + t["calibrate_s"] == pytest.approx(t["fit_s"])
    assert "Training dense-ae" in err  # progress still on stderr

    rc, out, _ = run(capsys, "evaluate", path, "--json")
    ev = json.loads(out)
    assert rc == 0 and ev["auroc"] == pytest.approx(fit["metrics"]["auroc"])
    assert set(ev["operating_points"]) == {"fpr@1%", "fpr@5%"}

    rc, out, _ = run(capsys, "models", models, "--json")
    listed = json.loads(out)
    assert rc == 0 and [Path(m["path"]) for m in listed] == [path]
    assert listed[0]["metadata"]["name"] == "s" and len(listed[0]["sha256"]) == 64

    np.save(tmp_path / "x.npy", make_blobs(5, seed=8))
    rc, out, err = run(capsys, "score", path, "--input", tmp_path / "x.npy", "--output",
                       tmp_path / "s.csv", "--json")
    summary = json.loads(out)
    assert rc == 0 and summary["n_scored"] == 5 and summary["operating_point"] == "fpr@1%"
    assert summary["n_anomalous"] == int(pd.read_csv(tmp_path / "s.csv")["is_anomaly"].sum())
    assert_error(capsys, ["score", path, "--input", tmp_path / "x.npy", "--output", "-",
                          "--json"], "--output FILE.csv with --json", code=2)

    np.save(tmp_path / "normal.npy", make_blobs(60, seed=9))
    rc, out, err = run(capsys, "calibrate", path, "--normal", tmp_path / "normal.npy",
                       "--force-calibration", "--json")
    cal = json.loads(out)
    assert rc == 0, err
    assert Path(cal["artifact"]).parent == path.parent and cal["n_normal"] == 60
    assert cal["lineage"]["parent"]["version"] == path.name


def test_score_to_standard_output_is_only_the_csv(capsys, saved_artifact, files):
    rc, out, err = run(capsys, "score", saved_artifact, "--input", files / "good.npy",
                       "--output", "-")
    assert rc == 0
    import io

    assert len(pd.read_csv(io.StringIO(out))) == 6
    assert "Scored 6 images" in err and "Scored" not in out


def test_quiet_and_verbose(capsys, tmp_path, shapes):
    argv = ["fit", "--dataset", shapes, *_TINY_FIT, "--output", tmp_path / "m"]
    rc, out, err = run(capsys, *argv, "-q")
    assert rc == 0 and err == ""  # errors only: there were none
    assert "Artifact:" in out  # the result still goes to stdout
    rc, _, err = run(capsys, *argv)
    epoch_lines = [ln for ln in err.splitlines() if ln.startswith("epoch 1/1:")]
    assert rc == 0 and len(epoch_lines) == 1 and "reconstruction_loss" not in epoch_lines[0]
    rc, _, err = run(capsys, *argv, "-v")
    epoch_lines = [ln for ln in err.splitlines() if ln.startswith("epoch 1/1:")]
    assert rc == 0 and len(epoch_lines) == 1 and "val_reconstruction_loss" in epoch_lines[0]
    assert_error(capsys, [*argv, "-q", "-v"], "not allowed with argument", code=2)


def test_fit_reports_its_wall_time_with_its_parts(capsys, tmp_path, shapes):
    import re

    rc, out, err = run(capsys, "fit", "--dataset", shapes, *_TINY_FIT[:-1], "--output",
                       tmp_path / "m")
    assert rc == 0, err
    m = re.search(r"Time: ([\d.]+) s \(start-up ([\d.]+), data ([\d.]+), training ([\d.]+), "
                  r"calibration ([\d.]+), evaluation ([\d.]+), save ([\d.]+), report ([\d.]+)\)"
                  r"; 1 epochs", out)
    assert m, out
    wall, *parts = map(float, m.groups())
    assert sum(parts) <= wall + 0.5
    assert "Report: " in out and "report.html" in out


def test_exit_codes_usage_runtime_interrupt(capsys, tmp_path, shapes, monkeypatch):
    assert_error(capsys, ["score", "--no-such-flag"], "the following arguments are required",
                 code=2)
    assert_error(capsys, ["evaluate", tmp_path / "nope"], "Expected an artifact directory",
                 code=1)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "fit", interrupted)
    models = tmp_path / "models"
    rc, _out, err = run(capsys, "fit", "--dataset", shapes, *_TINY_FIT, "--output", models)
    assert rc == 130 and "interrupted: nothing was written" in err and "Traceback" not in err
    assert not any(p.is_dir() and not p.name.startswith(".")
                   for p in models.rglob("*") if p.parent.parent == models)


def test_quick_mode_defaults_only_unset_flags(capsys, tmp_path, monkeypatch):
    np.save(tmp_path / "blobs.npy", make_blobs(400, seed=6))
    monkeypatch.setenv("ANOMALY_QUICK", "1")
    base = ["fit", "--dataset", tmp_path / "blobs.npy", "--model", "dense-ae", "--hidden",
            "16", "--latent-dim", "2", "--no-report", "--json"]
    rc, out, err = run(capsys, *base, "--output", tmp_path / "a")
    assert rc == 0, err
    meta = json.loads((Path(json.loads(out)["artifact"]) / "metadata.json").read_text())
    assert meta["epochs_run"] == 1 and meta["n_train"] + meta["n_val"] == 300
    assert "test_limit: 1000" in (Path(json.loads(out)["artifact"]) / "config.yaml").read_text()
    rc, out, err = run(capsys, *base, "--output", tmp_path / "b", "--epochs", "2",
                       "--train-limit", "350")
    assert rc == 0, err
    meta = json.loads((Path(json.loads(out)["artifact"]) / "metadata.json").read_text())
    assert meta["epochs_run"] == 2 and meta["n_train"] + meta["n_val"] == 350


# -- anomaly data sample ------------------------------------------------------------------------


@pytest.fixture
def fake_mnist(monkeypatch):
    """A 30-image stand-in for MNIST's test split (3 per class), no download."""
    from anomaly.data import builtin

    x = (np.arange(30 * 28 * 28) % 251).astype(np.uint8).reshape(30, 28, 28)
    ds = builtin.Dataset("mnist", x, np.arange(30) % 10, x, np.arange(30) % 10,
                         class_names=tuple(str(i) for i in range(10)), source="fake")
    monkeypatch.setattr(builtin, "load_dataset", lambda name, cache_dir=None: ds)
    return ds


def test_data_sample_writes_labelled_png_folders(capsys, tmp_path, fake_mnist, saved_artifact):
    out = tmp_path / "digits"
    rc, stdout, err = run(capsys, "data", "sample", "--dataset", "mnist", "--classes", "0,7",
                          "--n", "2", "--output", f"{out}/")
    assert rc == 0, err
    assert "Wrote 4 mnist test images (classes 0, 7)" in stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert len(files) == 4 and {f.split("/")[0] for f in files} == {"0", "7"}
    for f in files:
        index = int(f.split("test-")[1][:5])
        assert fake_mnist.y_test[index] == int(f.split("/")[0])
        np.testing.assert_array_equal(np.asarray(Image.open(out / f)), fake_mnist.x_test[index])
    rc, _, err = run(capsys, "data", "sample", "--classes", "3", "--n", "1", "--output", out)
    assert rc == 0 and [p.name for p in out.iterdir()] == ["3"]  # replaced whole
    rc, stdout, _ = run(capsys, "score", saved_artifact, "--input", out, "--output",
                        tmp_path / "s.csv")
    assert rc == 0 and "Scored 1 images" in stdout
    assert_error(capsys, ["data", "sample", "--classes", "12", "--output", out],
                 "Received: 12", code=2)


# -- --skip-bad -------------------------------------------------------------------------------


def _png_folder(folder: Path, n: int = 4, *, corrupt: int = 1) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(make_blobs(n, seed=7)):
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / f"ok{i}.png")
    for i in range(corrupt):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    return folder


def test_score_skip_bad_lists_the_skipped_files(capsys, tmp_path, saved_artifact):
    folder = _png_folder(tmp_path / "pngs", 3, corrupt=2)
    out = tmp_path / "s.csv"
    assert_error(capsys, ["score", saved_artifact, "--input", folder, "--output", out],
                 "bad0.png", "undecodable bytes", code=1)
    assert not out.exists()  # strict by default
    rc, stdout, err = run(capsys, "score", saved_artifact, "--input", folder, "--output", out,
                          "--skip-bad")
    assert rc == 0, err
    assert "Scored 3 images" in stdout
    assert "Skipped 2 bad file(s):" in err and "bad1.png: Expected" in err
    df = pd.read_csv(out, keep_default_na=False)
    assert df["id"].tolist() == ["ok0.png", "ok1.png", "ok2.png", "bad0.png", "bad1.png"]
    assert (df["skipped"][:3] == "").all() and df["skipped"][3].startswith("Expected")
    assert (df["score"][3:] == "").all() and (df["score"][:3] != "").all()
    rc, stdout, _ = run(capsys, "score", saved_artifact, "--input", folder, "--output", out,
                        "--skip-bad", "--json")
    assert [s["id"] for s in json.loads(stdout)["skipped"]] == ["bad0.png", "bad1.png"]
    for f in folder.glob("ok*.png"):
        f.unlink()
    assert_error(capsys, ["score", saved_artifact, "--input", folder, "--output", out,
                          "--skip-bad"], "at least one readable image file", code=1)


def test_fit_skip_bad_records_the_skipped_files(capsys, tmp_path):
    """A labelled folder with one corrupt file: strict by default; with --skip-bad the fit
    records it, and evaluate rebuilds the same split (skipping it again) without the flag."""
    folder = tmp_path / "pngs"
    _png_folder(folder / "good", 60)
    (folder / "bars").mkdir()
    for i, img in enumerate(make_bars(15, seed=7)):
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / "bars" / f"{i}.png")
    argv = ["fit", "--dataset", folder, "--normal-class", "good", *_TINY_FIT, "--output",
            tmp_path / "m", "--name", "p"]
    assert_error(capsys, argv, "bad0.png", code=1)
    rc, _, err = run(capsys, *argv, "--skip-bad")
    assert rc == 0, err
    assert "Skipped 1 bad file(s):\n  good/bad0.png: Expected" in err
    path = next((tmp_path / "m" / "p").iterdir())
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["skip_bad"] is True
    assert [f["file"] for f in meta["skipped_files"]] == ["good/bad0.png"]
    saved = json.loads((path / "metrics.json").read_text())
    assert saved["n_test"] == 15  # a fifth of the 75 readable images
    rc, out, err = run(capsys, "evaluate", path, "--json")
    assert rc == 0, err
    again = json.loads(out)
    assert again["n_test"] == 15 and again["auroc"] == pytest.approx(saved["auroc"])


def test_fit_streams_a_folder_from_disk_with_the_same_results(capsys, tmp_path):
    """--stream always: the artifact records it, scores, and evaluate rebuilds its split; the
    metrics are those of the same fit read into memory (the same batches: see
    tests/test_training.py)."""
    folder = tmp_path / "pngs"
    for name, images in (("good", make_blobs(60, seed=2)), ("bars", make_bars(15, seed=7))):
        (folder / name).mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / name / f"{i}.png")
    metrics = {}
    for stream in ("always", "never"):
        rc, out, err = run(capsys, "fit", "--dataset", folder, "--normal-class", "good",
                           *_TINY_FIT, "--stream", stream, "--output", tmp_path / "m",
                           "--name", stream, "--json")
        assert rc == 0, err
        metrics[stream] = json.loads(out)["metrics"]
        path = next((tmp_path / "m" / stream).iterdir())
        assert json.loads((path / "metadata.json").read_text())["streamed"] is (
            stream == "always")
    assert metrics["always"] == metrics["never"]
    path = next((tmp_path / "m" / "always").iterdir())
    rc, out, err = run(capsys, "evaluate", path, "--json")
    assert rc == 0, err
    assert json.loads(out)["auroc"] == metrics["always"]["auroc"]
    rc, _, err = run(capsys, "score", path, "--input", folder / "bars",
                     "--output", tmp_path / "s.csv")
    assert rc == 0, err
    scores = pd.read_csv(tmp_path / "s.csv")
    assert len(scores) == 15 and np.isfinite(scores["score"]).all()


def test_stream_always_refuses_what_cannot_be_streamed_before_loading(capsys, tmp_path):
    assert_error(capsys, ["fit", "--dataset", "mnist", "--stream", "always", "--output",
                          tmp_path], "to stream from disk (--stream always)",
                 "Received: 'mnist'", "--stream auto or never")
