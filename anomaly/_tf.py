"""Import TensorFlow once, without its start-up noise on stderr.

TensorFlow 2.21 logs oneDNN, CPU-feature and "no CUDA driver" lines through absl before any
log level applies, which buries the CLI's own output. They are discarded while TensorFlow
imports and initializes its devices; set ``ANOMALY_TF_LOGS=1`` to see them. Under ``TF_CONFIG``
the devices are left for ``MultiWorkerMirroredStrategy`` to initialize.
"""

from __future__ import annotations

import os
import sys


def import_quietly() -> None:
    if "tensorflow" in sys.modules or os.environ.get("ANOMALY_TF_LOGS") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        # A worker of a TF_CONFIG cluster leaves the devices alone: MultiWorkerMirroredStrategy
        # configures collective ops, which TensorFlow refuses once its devices are initialized
        # ("Collective ops must be configured at program startup"). Its noise then shows.
        if not os.environ.get("TF_CONFIG"):
            tf.config.list_logical_devices()
        # Retracing notices are expected: each Scorer compiles its own graph once.
        tf.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


import_quietly()

import tensorflow as tf  # noqa: E402  (after the quiet import above)

__all__ = ["import_quietly", "tf"]
