"""Artifacts: save, verify, load; tampered, incomplete or unknown artifacts are refused; atomic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from anomaly import artifact
from anomaly.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    list_artifacts,
    read_info,
    resolve,
    verify,
)
from anomaly.config import default_of
from anomaly.detector import Detector
from anomaly.errors import ArtifactError, NotFoundError
from anomaly.utils import sha256_file

REQUIRED = ("model.keras", "detector.json", "calibration.json", "metadata.json")


def save_detector(det, path, *, metrics=None, per_class=None, config_yaml=None, metadata=None,
                  overwrite=False):
    """Today's way of adding the evaluation files: ``extra_files`` of ``Detector.save``."""
    extra = {}
    if metrics is not None:
        extra["metrics.json"] = json.dumps(metrics)
    if per_class is not None:
        extra["per_class.csv"] = per_class.to_csv(index=False)
    if config_yaml is not None:
        extra["config.yaml"] = config_yaml
    return det.save(path, metadata=metadata, extra_files=extra, overwrite=overwrite)


def test_saved_layout_and_manifest(saved_artifact):
    names = {p.name for p in saved_artifact.iterdir()}
    assert set(REQUIRED) | {MANIFEST, "history.csv"} <= names
    manifest = json.loads((saved_artifact / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == names - {MANIFEST}
    for name, digest in manifest["files"].items():
        assert sha256_file(saved_artifact / name) == digest
    assert verify(saved_artifact) == manifest


def test_metadata_records_provenance(saved_artifact):
    meta = json.loads((saved_artifact / "metadata.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["name"] == "blobs" and meta["version"] == "1"
    assert meta["model_type"] == "dense-ae"
    assert meta["dataset"] == "blobs" and meta["normal_classes"] == [0]
    assert {"python", "tensorflow", "keras", "numpy", "scikit-learn"} <= set(meta["libraries"])
    assert meta["created_at"].endswith("+00:00")
    spec = json.loads((saved_artifact / "detector.json").read_text())
    assert spec["hyperparameters"]["model"] == "dense-ae" and spec["code_dim"] == 4
    history = pd.read_csv(saved_artifact / "history.csv")
    assert len(history) == 2 and {"epoch", "loss", "val_loss"} <= set(history.columns)


def test_load_gives_identical_scores_and_info(saved_artifact, dense_detector, anomaly_images):
    det = Detector.load(saved_artifact)
    np.testing.assert_array_equal(det.decision_function(anomaly_images), dense_detector.decision_function(anomaly_images))
    info = read_info(saved_artifact)
    assert det.artifact_sha256_ == info.sha256 and len(info.sha256) == 64
    assert det.path_ == saved_artifact and det.metrics_ is None


def test_optional_files_metrics_per_class_config(dense_detector, tmp_path):
    per_class = pd.DataFrame({"class": [0, 1], "n": [3, 4]})
    path = save_detector(dense_detector, tmp_path / "m" / "v1", metrics={"auroc": 0.9},
                         per_class=per_class, config_yaml="epochs: 2\n")
    assert (path / "config.yaml").read_text() == "epochs: 2\n"
    pd.testing.assert_frame_equal(pd.read_csv(path / "per_class.csv"), per_class)
    det = Detector.load(path)
    assert det.metrics_ == {"auroc": 0.9}
    assert {"config.yaml", "metrics.json", "per_class.csv"} <= set(verify(path)["files"])


def test_existing_path_is_not_overwritten_unless_asked(dense_detector, saved_artifact, tmp_path):
    with pytest.raises(ArtifactError, match=r"does not exist yet.*\(exists\)"):
        save_detector(dense_detector, saved_artifact)
    path = tmp_path / "a" / "1"
    save_detector(dense_detector, path, metrics={"auroc": 0.1})
    save_detector(dense_detector, path, metrics={"auroc": 0.2}, overwrite=True)
    assert Detector.load(path).metrics_ == {"auroc": 0.2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"]  # no leftovers


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.keras", "calibration.json", "metadata.json",
                                  "history.csv"])
def test_tampered_file_is_refused(artifact_copy, name):
    _flip_one_byte(artifact_copy / name)
    with pytest.raises(ArtifactError, match=rf"Expected {name} with SHA-256 [0-9a-f]{{64}}\. "
                                            r"Received: [0-9a-f]{64} .*modified or damaged"):
        Detector.load(artifact_copy)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match=r"Expected calibration\.json in the artifact\. "
                                            r"Received: missing from .*incomplete"):
        verify(artifact_copy)


def test_extra_file_is_refused(artifact_copy):
    (artifact_copy / "backdoor.py").write_text("print('hi')\n")
    with pytest.raises(ArtifactError, match=r"only the files listed in the manifest. "
                                            r"Received: unlisted \['backdoor.py'\]"):
        Detector.load(artifact_copy)


def test_missing_manifest_is_refused(artifact_copy):
    (artifact_copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"Expected manifest\.json in the artifact\. "
                                            r"Received: no manifest in"):
        Detector.load(artifact_copy)


def test_unreadable_manifest_is_refused(artifact_copy):
    (artifact_copy / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"a readable manifest\.json\. Received: JSONDecodeError"):
        verify(artifact_copy)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_wrong_format_version_is_refused(artifact_copy):
    _edit_manifest(artifact_copy, format_version=99)
    with pytest.raises(ArtifactError, match=f"Expected artifact format version {FORMAT_VERSION}. "
                                            "Received: 99. It was written by another version"):
        Detector.load(artifact_copy)


def test_an_mse_knn_tp_artifact_of_the_earlier_classifier_is_refused(artifact_copy):
    """Before tp_filters the classifier was pooled, not strided: its weights cannot fill
    today's network, and the error says so instead of a Keras shape mismatch."""
    spec_path = artifact_copy / "detector.json"
    spec = json.loads(spec_path.read_text())
    spec["hyperparameters"]["score"] = "mse+knn+tp"
    del spec["hyperparameters"]["tp_filters"]
    spec_path.write_text(json.dumps(spec))
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    _edit_manifest(artifact_copy, files={**manifest["files"],
                                         "detector.json": sha256_file(spec_path)})
    with pytest.raises(ArtifactError, match=r"Expected an mse\+knn\+tp artifact with the strided "
                                            r"transformation classifier .*Received: one with the "
                                            r"earlier pooled classifier .*Train it again"):
        Detector.load(artifact_copy)


def test_an_artifact_from_before_holdout_runs_loads_as_held_out_by_single_images(
        artifact_copy):
    """``get_params`` of an older artifact say how it was fitted, not today's default."""
    spec_path = artifact_copy / "detector.json"
    spec = json.loads(spec_path.read_text())
    assert spec["hyperparameters"]["holdout_run"] == default_of("holdout_run")
    del spec["hyperparameters"]["holdout_run"]
    spec_path.write_text(json.dumps(spec))
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    _edit_manifest(artifact_copy, files={**manifest["files"],
                                         "detector.json": sha256_file(spec_path)})
    assert Detector.load(artifact_copy).holdout_run == 1


def test_manifest_without_a_required_file_is_refused(artifact_copy):
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    files = {k: v for k, v in manifest["files"].items() if k != "model.keras"}
    (artifact_copy / "model.keras").unlink()
    _edit_manifest(artifact_copy, files=files)
    verify(artifact_copy)  # the format only knows files; the detector knows it needs a model
    with pytest.raises(ArtifactError, match=r"Expected model.keras in the artifact. Received: "
                                            r"not listed"):
        Detector.load(artifact_copy)


def test_deeply_nested_manifest_is_a_clean_error(artifact_copy):
    (artifact_copy / MANIFEST).write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(ArtifactError, match=r"a readable manifest\.json\. Received: "
                                            r"RecursionError"):
        verify(artifact_copy)


def test_model_folder_resolves_to_its_newest_version(saved_artifact, dense_detector, caplog):
    import logging

    root = saved_artifact.parent
    newer = dense_detector.save(root / "10")
    try:
        with caplog.at_level(logging.INFO, logger="anomaly"):
            assert resolve(root) == newer
        assert "newest version 10" in caplog.text
        assert Detector.load(root).path_ == newer
        assert resolve("blobs@latest", root.parent) == newer
        assert resolve("blobs@1", root.parent) == saved_artifact
        assert resolve(f"{root}@latest") == newer  # MODELS/NAME@VERSION names its folder
        assert resolve(f"{root}@1") == saved_artifact
        with pytest.raises(NotFoundError, match="version '7' of 'blobs'"):
            resolve("blobs@7", root.parent)
        with pytest.raises(NotFoundError, match="a model named 'nope'"):
            resolve("nope@latest", root.parent)
    finally:
        shutil.rmtree(newer)


def test_artifact_module_is_format_only():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(artifact.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and (m.split(".")[0] in ("tensorflow", "keras",
                                                                   "numpy")
                                              or m in ("anomaly.detector",
                                                       "anomaly.calibration"))}


def test_missing_artifact_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=r"Expected an artifact directory. Received: .*"
                                            r"\(not found\)"):
        Detector.load(tmp_path / "nothing")


def test_unverified_load_still_fails_cleanly_on_a_broken_model(artifact_copy):
    (artifact_copy / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="Expected a loadable artifact"):
        Detector.load(artifact_copy, verify=False)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing_behind(dense_detector, tmp_path, monkeypatch, exc):
    """A save that fails after most files are written leaves no artifact and no temp dir."""

    def broken(path):
        raise exc

    monkeypatch.setattr(artifact, "sha256_file", broken)  # fails while writing the manifest
    root = tmp_path / "models" / "blobs"
    with pytest.raises(type(exc)):
        save_detector(dense_detector, root / "1")
    assert not (root / "1").exists()
    assert list(root.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(dense_detector, tmp_path, monkeypatch):
    path = save_detector(dense_detector, tmp_path / "m" / "1", metrics={"auroc": 0.5})
    monkeypatch.setattr(artifact, "sha256_file", lambda p: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_detector(dense_detector, path, metrics={"auroc": 0.9}, overwrite=True)
    monkeypatch.undo()
    assert Detector.load(path).metrics_ == {"auroc": 0.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"]


def test_list_artifacts(saved_artifact, dense_detector):
    root = saved_artifact.parent.parent
    second = save_detector(dense_detector, root / "blobs" / "2", metadata={"dataset": "blobs"})
    (root / "blobs" / ".resume-abc").mkdir()  # in-progress state is not an artifact
    (root / "blobs" / ".resume-abc" / MANIFEST).write_text("{}")
    try:
        infos = list_artifacts(root)
        assert [i.path for i in infos] == [saved_artifact, second]
        assert infos[0].metadata["model_type"] == "dense-ae"
    finally:
        for p in (second, root / "blobs" / ".resume-abc"):
            shutil.rmtree(p)
    with pytest.raises(NotFoundError, match="a models directory"):
        list_artifacts(root / "missing")


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "x" * 129, "sp ace"])
def test_bad_artifact_names(name):
    with pytest.raises(ArtifactError, match="letters, digits"):
        artifact.check_name(name)
    assert artifact.check_name("mnist-0_6-conv-ae.v2") == "mnist-0_6-conv-ae.v2"


def test_versions_sort_naturally():
    from anomaly.artifact import version_key

    versions = ["v10", "v9", "20261123T170545Z-10", "20261123T170545Z", "20261123T170545Z-2"]
    assert sorted(versions, key=version_key) == [
        "20261123T170545Z", "20261123T170545Z-2", "20261123T170545Z-10", "v9", "v10"]
