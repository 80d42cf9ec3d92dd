"""anomaly.engines: batch scoring in parts, on this process or on Ray, restartable.

A tiny dense-ae artifact exported to ONNX scores a few thousand synthetic images from ``.npy``
shards and Parquet; the local and Ray engines must write the same rows bit for bit, keep every
id, and a run that dies part-way must finish without losing or duplicating a row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.engines import score_dataset
from anomaly.engines.blocks import RUN_FILE, SUCCESS_FILE, part_name
from anomaly.errors import ConfigError, DataError
from tests.conftest import error_line, make_bars, make_blobs, run_cli

pq = pytest.importorskip("pyarrow.parquet")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(saved_artifact, tmp_path_factory) -> Path:
    """The session's dense-ae artifact, exported to ONNX (a new version beside it)."""
    from anomaly.export.onnx import export_onnx

    dest = tmp_path_factory.mktemp("engine-models") / "blobs" / "2"
    export_onnx(saved_artifact, dest)
    return dest


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """2,000 uint8 images ``(2000, 28, 28)``: blobs (normal) then bars (anomalies)."""
    x = np.concatenate([make_blobs(1500, seed=21), make_bars(500, seed=22)])
    return np.round(x * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory) -> Path:
    """``images`` as three ``.npy`` shards of unequal length."""
    root = tmp_path_factory.mktemp("npy-shards")
    for name, (a, b) in {"a.npy": (0, 700), "b.npy": (700, 1300), "c.npy": (1300, 2000)}.items():
        np.save(root / name, images[a:b])
    return root


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parquet_png(images, tmp_path_factory) -> Path:
    import pyarrow as pa

    path = tmp_path_factory.mktemp("parquet") / "images.parquet"
    table = pa.table({"id": [f"img-{i:05d}" for i in range(len(images))],
                      "image": [_png(a) for a in images]})
    pq.write_table(table, path, row_group_size=300)
    return path


def read_parts(folder: Path) -> pd.DataFrame:
    run = json.loads((folder / SUCCESS_FILE).read_text())
    return pd.concat([pd.read_parquet(folder / part_name(i, "parquet"))
                      for i in range(run["parts"])], ignore_index=True)


def test_local_engine_scores_shards_like_the_detector(artifact, shards, images, tmp_path):
    from anomaly.detector import Detector

    out = tmp_path / "out"
    summary = score_dataset(artifact, shards, out, block_rows=256, runtime="keras")
    df = read_parts(out)
    assert summary["rows"] == summary["scored"] == len(images) == len(df)
    # Ids name the shard and row; rows keep the input's order within each part.
    assert df["id"].iloc[0] == "a.npy:0" and df["id"].iloc[700] == "b.npy:0"
    assert df["id"].is_unique
    det = Detector.load(artifact)
    np.testing.assert_array_equal(df["score"].to_numpy(), det.decision_function(images))
    assert set(df.columns) == {"id", "score", "normalized_score", "is_anomaly"}
    assert df["is_anomaly"].to_numpy().sum() == summary["anomalous"]
    # The bars are the anomalies: most are flagged, few blobs are.
    assert df["is_anomaly"].to_numpy()[1500:].mean() > 0.9


def test_parquet_of_png_bytes_and_of_pixel_arrays_score_alike(artifact, images, parquet_png,
                                                              tmp_path):
    import pyarrow as pa

    arrays = tmp_path / "arrays.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in images[:600]]}), arrays,
                   row_group_size=250)
    a = read_parts_of(score_dataset(artifact, parquet_png, tmp_path / "png"))
    b = read_parts_of(score_dataset(artifact, arrays, tmp_path / "arr"))
    assert a["id"].iloc[0] == "img-00000" and len(a) == len(images)
    assert list(b["id"][:2]) == ["arrays.parquet:0", "arrays.parquet:1"]  # no id column
    np.testing.assert_array_equal(a["score"].to_numpy()[:600], b["score"].to_numpy())


def read_parts_of(summary: dict) -> pd.DataFrame:
    return read_parts(Path(summary["output"]))


def test_a_run_that_dies_resumes_without_losing_or_duplicating_rows(artifact, shards, images,
                                                                    tmp_path):
    out = tmp_path / "out"
    seen = []

    def die_after_three(counts):
        seen.append(counts["index"])
        if len(seen) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-run

    with pytest.raises(KeyboardInterrupt):
        score_dataset(artifact, shards, out, block_rows=200, on_block=die_after_three)
    assert not (out / SUCCESS_FILE).exists()
    (out / ".part-000005.parquet.tmp-x").write_bytes(b"half a file")  # a rename never made
    started = []
    summary = score_dataset(artifact, shards, out, block_rows=200,
                            on_start=lambda total, todo: started.append((total, todo)))
    assert started == [(len(images), len(images) - 600)]
    assert summary["parts_resumed"] == 3 and summary["rows"] == len(images)
    df = read_parts(out)
    assert df["id"].is_unique and len(df) == len(images)
    whole = read_parts_of(score_dataset(artifact, shards, tmp_path / "whole", block_rows=200))
    pd.testing.assert_frame_equal(df, whole)
    # Started again once finished: nothing is scored twice.
    again = score_dataset(artifact, shards, out, block_rows=200)
    assert again["parts_written"] == 0 and again["rows"] == len(images)


def test_an_output_folder_of_another_run_is_refused(artifact, shards, tmp_path):
    out = tmp_path / "out"
    score_dataset(artifact, shards, out, block_rows=500)
    with pytest.raises(ConfigError, match=r"different (block|input_fingerprint)"):
        score_dataset(artifact, shards, out, block_rows=400)
    with pytest.raises(ConfigError, match="different runtime"):
        score_dataset(artifact, shards, out, block_rows=500, runtime="keras")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"not empty, and no {RUN_FILE}"):
        score_dataset(artifact, shards, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_bad_inputs_get_clear_errors(artifact, shards, tmp_path):
    import pyarrow as pa

    no_image = tmp_path / "no-image.parquet"
    pq.write_table(pa.table({"id": ["a"], "pixels": [[0] * 784]}), no_image)
    with pytest.raises(DataError, match=r"image column 'image'.*\['id', 'pixels'\]"):
        score_dataset(artifact, no_image, tmp_path / "o1")
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"image": [[0] * 784, [0] * 700]}), ragged)
    with pytest.raises(DataError, match="pixel arrays of one length"):
        score_dataset(artifact, ragged, tmp_path / "o2")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((2, 28, 28), np.uint8))
    pq.write_table(pa.table({"image": [[0] * 784]}), mixed / "b.parquet")
    with pytest.raises(DataError, match=r"one kind of input.*1 npy, 1 parquet"):
        score_dataset(artifact, mixed, tmp_path / "o3")
    with pytest.raises(ConfigError, match="engine in"):
        score_dataset(artifact, shards, tmp_path / "o4", engine="spark")
    with pytest.raises(ConfigError, match="only with --engine ray"):
        score_dataset(artifact, shards, tmp_path / "o5", address="auto")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_undecodable_rows_are_skipped_and_listed_with_skip_bad(artifact, images, tmp_path):
    import pyarrow as pa

    path = tmp_path / "some-bad.parquet"
    blobs = [_png(a) for a in images[:10]]
    blobs[3] = b"not a png"
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "image": blobs}), path)
    with pytest.raises(DataError, match=r"row 3.*PNG"):
        score_dataset(artifact, path, tmp_path / "strict")
    summary = score_dataset(artifact, path, tmp_path / "lenient", skip_bad=True)
    df = read_parts(tmp_path / "lenient")
    assert (summary["scored"], summary["skipped"], len(df)) == (9, 1, 10)
    bad = df[df["skipped"].notna()]
    assert list(bad["id"]) == ["3"] and bad["score"].isna().all()


def test_cli_scores_into_a_folder_and_refuses_folder_flags_with_a_csv(artifact, shards,
                                                                      tmp_path):
    out = tmp_path / "parts"
    r = run_cli("score", str(artifact), "--input", str(shards), "--output", str(out),
                "--block-rows", "1000", "--output-format", "csv", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["rows"] == 2000 and summary["parts"] == 3
    assert pd.read_csv(out / "part-000000.csv").columns.tolist() == [
        "id", "score", "normalized_score", "is_anomaly"]
    r = run_cli("score", str(artifact), "--input", str(shards / "a.npy"), "--output",
                str(tmp_path / "x.csv"), "--num-actors", "2")
    assert r.returncode == 2 and "--num-actors with an --output folder" in error_line(r.stderr)


# -- Ray ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for this module; its workers import this checkout."""
    ray = pytest.importorskip("ray")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_engine_writes_exactly_the_local_engines_rows(local_ray, artifact, shards,
                                                          parquet_png, tmp_path):
    for source, name in ((shards, "npy"), (parquet_png, "png")):
        local = score_dataset(artifact, source, tmp_path / f"local-{name}", block_rows=300)
        on_ray = score_dataset(artifact, source, tmp_path / f"ray-{name}", engine="ray",
                               num_actors=2, block_rows=300)
        assert on_ray["processes"] == 2 and on_ray["runtime"] == ["onnx"]
        assert local["rows"] == on_ray["rows"] == 2000
        pd.testing.assert_frame_equal(read_parts_of(local), read_parts_of(on_ray))


class CrashOnce:
    """An actor that dies (the whole process) the first time it meets block 2."""

    def __init__(self, marker: str, **kwargs):
        from anomaly.engines.ray import RayScorer

        self.marker, self.inner = Path(marker), RayScorer(**kwargs)

    def __call__(self, batch):
        from anomaly.data.shards import Block

        if Block.from_json(str(batch["block"][0])).index == 2 and not self.marker.exists():
            self.marker.write_text("crashed")
            os._exit(1)
        return self.inner(batch)


def test_ray_retries_a_block_whose_actor_died(local_ray, artifact, shards, tmp_path):
    import cloudpickle

    from anomaly.data.shards import plan_blocks
    from anomaly.engines import ray as ray_engine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    plan = plan_blocks(shards, block_rows=400)
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "crashed"
    kwargs = {"artifact": str(artifact), "output": str(out), "marker": str(marker)}
    counts = list(ray_engine.run(plan.blocks, kwargs, num_actors=2, actor_cls=CrashOnce))
    assert marker.exists()  # the crash happened, and the block was scored all the same
    assert sorted(c["index"] for c in counts) == [b.index for b in plan.blocks]
    assert sorted(p.name for p in out.iterdir()) == [part_name(b.index, "parquet")
                                                     for b in plan.blocks]


def test_ray_errors_name_the_fix(artifact, shards, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"Ray cluster answering.*127\.0\.0\.1:9"):
        from anomaly.engines.ray import _check_reachable

        _check_reachable("127.0.0.1:9")
    with pytest.raises(ConfigError, match="a Ray address"):
        _check_reachable("nowhere")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r'pip install "anomaly\[ray\]"'):
        score_dataset(artifact, shards, tmp_path / "o", engine="ray")
