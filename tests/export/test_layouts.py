"""Triton and KServe layouts of an ONNX export: structure checked against the real schemas.

``config.pbtxt`` is parsed strictly (unknown fields are errors) into Triton's own
``ModelConfig`` protobuf (from tritonclient) and compared with the ONNX graph's real inputs and
outputs; the InferenceService is validated against KServe v0.20.0's CRD schema vendored for
tests/deploy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from anomaly.artifact import read_artifact
from tests.conftest import error_line, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("tf2onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

from anomaly.export import layouts  # noqa: E402  (after the skips)
from anomaly.export.onnx import INPUT, export_onnx, onnx_session  # noqa: E402

SCHEMA = Path(__file__).resolve().parents[1] / "deploy" / "schemas" / (
    "inferenceservice_v1beta1.json")
#: ONNX element type -> Triton data type name.
ONNX_TO_TRITON = {1: "TYPE_FP32", 11: "TYPE_FP64", 9: "TYPE_BOOL"}


@pytest.fixture(scope="module")
def exported(saved_artifact, tmp_path_factory) -> Path:
    return export_onnx(saved_artifact, tmp_path_factory.mktemp("exp") / "blobs" / "2").path


def _config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _graph_io(model_path: Path) -> dict:
    graph = onnx.load(str(model_path)).graph
    out = {}
    for v in [*graph.input, *graph.output]:
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else -1
                                     for d in t.shape.dim])
    return out


def test_triton_repository_names_the_graphs_real_tensors(exported, tmp_path):
    repo = layouts.write_layout(exported, tmp_path / "repo", "triton")
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "blobs/1/model.onnx", "blobs/config.pbtxt", "blobs/onnx.json"]
    cfg = _config(repo / "blobs" / "config.pbtxt")
    assert cfg.name == "blobs" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == layouts.MAX_BATCH_SIZE
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    io = _graph_io(repo / "blobs" / "1" / "model.onnx")
    declared = {t.name: t for t in [*cfg.input, *cfg.output]}
    assert set(declared) == set(io)
    for name, (elem, shape) in io.items():
        t = declared[name]
        assert model_config_pb2.DataType.Name(t.data_type) == ONNX_TO_TRITON[elem], name
        assert shape[0] == -1, name  # every tensor is batched along its first axis
        if len(shape) == 1:
            assert list(t.dims) == [1] and t.HasField("reshape") and not t.reshape.shape
        else:
            assert list(t.dims) == shape[1:], name
    assert list(declared[INPUT].dims) == [28, 28]
    ops = json.loads(cfg.parameters["anomaly.operating_points"].string_value)
    assert ops == read_artifact(exported).json("onnx.json")["operating_points"]
    assert list(declared["is_anomaly"].dims) == [len(ops)]
    # The repository's graph is the artifact's, byte for byte, and it runs.
    assert (repo / "blobs" / "1" / "model.onnx").read_bytes() == read_artifact(
        exported).file("model.onnx").read_bytes()
    session = onnx_session((repo / "blobs" / "1" / "model.onnx").read_bytes())
    (score,) = session.run(["score"], {INPUT: np.zeros((3, 28, 28), np.float32)})
    assert score.shape == (3,)


def test_strict_parser_catches_a_wrong_field(exported, tmp_path):
    from google.protobuf import text_format

    repo = layouts.write_layout(exported, tmp_path / "repo", "triton")
    text = (repo / "blobs" / "config.pbtxt").read_text().replace("max_batch_size",
                                                                 "max_batch")
    with pytest.raises(text_format.ParseError, match="max_batch"):
        text_format.Parse(text, model_config_pb2.ModelConfig())


def test_kserve_manifest_passes_the_crd_schema(exported, tmp_path):
    import jsonschema

    out = layouts.write_layout(exported, tmp_path / "kserve", "kserve",
                               storage_uri="s3://bucket/anomaly")
    assert (out / "blobs" / "config.pbtxt").is_file()
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(isvc)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://bucket/anomaly"
    assert isvc["metadata"]["name"] == "blobs"
    bad = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "modle": {}}}}
    with pytest.raises(jsonschema.ValidationError, match="modle"):  # the check can fail
        jsonschema.validators.validator_for(schema)(schema).validate(bad)


@pytest.mark.parametrize("name", ["mnist-0-conv-vae", "Digits_2.v1", "0abc", "a" * 80])
def test_kubernetes_names(name):
    k8s = layouts.k8s_name(name)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", k8s) and len(k8s) <= 63, k8s


def test_an_artifact_without_onnx_is_converted_first(saved_artifact, exported, tmp_path):
    repo = layouts.write_layout(saved_artifact, tmp_path / "repo", "triton")
    assert _config(repo / "blobs" / "config.pbtxt") == _config(
        layouts.write_layout(exported, tmp_path / "repo2", "triton") / "blobs" / "config.pbtxt")
    side = json.loads((repo / "blobs" / "onnx.json").read_text())
    assert side["verification"]["max_relative_error"] <= 1e-5


def test_cli_layout_errors(exported, tmp_path):
    no_output = run_cli("export", exported, "--format", "triton")
    assert no_output.returncode == 2
    assert "Expected --output DIR for --format triton" in error_line(no_output.stderr)
    (tmp_path / "taken").mkdir()
    taken = run_cli("export", exported, "--format", "kserve", "--output", tmp_path / "taken")
    assert taken.returncode == 2
    assert "does not exist yet" in error_line(taken.stderr)
    ok = run_cli("export", exported, "--format", "kserve", "--output", tmp_path / "k")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "k" / "inferenceservice.yaml").is_file()
