"""Portable exports of an artifact: one ONNX graph with everything a score needs
(:mod:`anomaly.export.onnx`), and serving layouts around it (:mod:`anomaly.export.layouts`:
a Triton model repository, a KServe InferenceService).

Importing this package imports neither TensorFlow nor onnx; each format imports its converter
when it runs.
"""

from __future__ import annotations

#: ``anomaly export --format``: the formats, in the order the CLI lists them.
FORMATS = ("onnx", "triton", "kserve")
