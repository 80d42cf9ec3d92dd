"""Serving layouts around an ONNX export: a Triton model repository and a KServe manifest.

``anomaly export ARTIFACT --format triton --output DIR`` writes

    DIR/NAME/config.pbtxt     platform onnxruntime_onnx, the graph's real inputs and outputs,
                              dynamic batching, CPU instances
    DIR/NAME/1/model.onnx     the graph (:mod:`anomaly.export.onnx`)
    DIR/NAME/onnx.json        its sidecar (calibration, operating point order, verification)

``--format kserve`` writes the same repository plus ``DIR/inferenceservice.yaml``, a KServe
``InferenceService`` (V2 protocol, the Triton runtime) whose ``storageUri`` is that repository
(``--storage-uri``, default ``pvc://anomaly-models/triton``: copy DIR there).

An artifact that already holds ``model.onnx`` is laid out as it is (no TensorFlow needed);
otherwise it is converted and verified first, in memory. ``DIR`` is written atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from anomaly.errors import ConfigError, expected

#: sidecar dtype -> Triton data type.
TRITON_TYPES = {"float32": "TYPE_FP32", "float64": "TYPE_FP64", "bool": "TYPE_BOOL"}
MAX_BATCH_SIZE = 1024
#: How long Triton may hold a request to batch it with others.
MAX_QUEUE_DELAY_US = 2000
DEFAULT_STORAGE_URI = "pvc://anomaly-models/triton"


def _onnx_of(artifact) -> tuple[bytes, dict, str]:
    """``(model.onnx bytes, sidecar, model name)`` of an artifact, converting it if needed."""
    from anomaly.artifact import read_artifact
    from anomaly.export.onnx import ONNX_FILE, SIDECAR

    art = read_artifact(artifact)
    name = str(art.metadata.get("name") or art.path.parent.name)
    if art.has(ONNX_FILE) and art.has(SIDECAR):
        return art.file(ONNX_FILE).read_bytes(), art.json(SIDECAR), name
    from anomaly.detector import Detector
    from anomaly.export.onnx import export_bytes

    data, sidecar, _ = export_bytes(Detector.load(art.path))
    sidecar["source"] = {"name": name, "version": art.path.name, "artifact_sha256": art.sha256}
    return data, sidecar, name


def _dims(shape: list[int]) -> tuple[list[int], bool]:
    """A graph shape ``[-1, ...]`` -> Triton ``dims`` without the batch dimension, and whether
    it needs ``reshape: { shape: [ ] }`` (one value per image: Triton wants ``dims: [ 1 ]``)."""
    rest = [int(d) for d in shape[1:]]
    return (rest, False) if rest else ([1], True)


def triton_config(name: str, sidecar: dict, *, max_batch_size: int = MAX_BATCH_SIZE,
                  instances: int = 1) -> str:
    """``config.pbtxt`` (protobuf text of Triton's ``ModelConfig``) for an export's sidecar."""

    def tensor(t: dict) -> str:
        dims, reshape = _dims(t["shape"])
        extra = "\n    reshape: { shape: [ ] }" if reshape else ""
        return (f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES[t["dtype"]]}\n'
                f'    dims: [ {", ".join(map(str, dims))} ]{extra}\n  }}')

    inputs = ",\n".join(tensor(t) for t in [sidecar["input"]])
    outputs = ",\n".join(tensor(t) for t in sidecar["outputs"])
    params = {"anomaly.operating_points": json.dumps(sidecar["operating_points"]),
              "anomaly.default_operating_point": sidecar["default_operating_point"],
              "anomaly.thresholds": json.dumps(sidecar["thresholds"], sort_keys=True),
              "anomaly.score": sidecar["score"]}
    parameters = "\n".join(
        f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(v)} }}\n}}'
        for k, v in params.items())
    return (f'# Written by anomaly export from {sidecar.get("source", {}).get("version", "?")}'
            f': is_anomaly columns are the operating points in order {sidecar["operating_points"]}.\n'
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
            f"{parameters}\n")


def k8s_name(name: str) -> str:
    """A model name as a Kubernetes resource name (RFC 1035 label: ``[a-z]([-a-z0-9]*[a-z0-9])?``,
    at most 63)."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not out or not out[0].isalpha():
        out = f"anomaly-{out}".rstrip("-")
    return out[:63].rstrip("-")


def inference_service(name: str, storage_uri: str = DEFAULT_STORAGE_URI) -> dict:
    """A KServe ``InferenceService`` serving the Triton repository at ``storage_uri`` (V2)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": k8s_name(name),
                     "labels": {"app.kubernetes.io/name": "anomaly",
                                "app.kubernetes.io/component": "onnx-predictor"},
                     "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"}},
        "spec": {"predictor": {
            "minReplicas": 1,
            "model": {
                "modelFormat": {"name": "onnx", "version": "1"},
                "protocolVersion": "v2",
                "runtime": "kserve-tritonserver",
                "storageUri": storage_uri,
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                              "limits": {"cpu": "2", "memory": "2Gi"}},
            },
        }},
    }


def write_layout(artifact, output: str | Path, fmt: str, *,
                 storage_uri: str = DEFAULT_STORAGE_URI) -> Path:
    """Write the ``triton`` or ``kserve`` layout of ``artifact`` at ``output`` (see module
    docstring); returns ``output``."""
    import yaml

    from anomaly.utils import atomic_dir

    if fmt not in ("triton", "kserve"):
        raise expected("a layout format in ('triton', 'kserve')", repr(fmt), cls=ConfigError)
    output = Path(output)
    if output.exists():
        raise expected("an output directory that does not exist yet", f"{output} (exists)",
                       hint="Pick another --output or remove it.", cls=ConfigError)
    data, sidecar, name = _onnx_of(artifact)
    with atomic_dir(output, replace=False) as tmp:
        model_dir = tmp / name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "1" / "model.onnx").write_bytes(data)
        (model_dir / "onnx.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        (model_dir / "config.pbtxt").write_text(triton_config(name, sidecar))
        if fmt == "kserve":
            (tmp / "inferenceservice.yaml").write_text(
                "# KServe InferenceService for the Triton model repository beside this file;\n"
                f"# copy the repository to {storage_uri} first.\n"
                + yaml.safe_dump(inference_service(name, storage_uri), sort_keys=False))
    return output
