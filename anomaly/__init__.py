"""anomaly: autoencoder anomaly detection for images.

Scores follow one convention everywhere: higher = more anomalous.

>>> from anomaly import Detector                                   # doctest: +SKIP
>>> Detector.load("models/mnist-0-conv-ae/20261123T154700Z").score(images)  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    # Lazy: importing TensorFlow takes seconds, and the CLI's argument errors should not wait.
    if name == "Detector":
        from anomaly.detector import Detector

        return Detector
    raise AttributeError(name)
