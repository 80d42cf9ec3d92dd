"""The autoencoder family: registry, networks, custom layers and the trainable model."""

from anomaly import _tf  # noqa: F401  (first: silences TF start-up logs)
from anomaly.models.autoencoder import MODELS, Autoencoder, ModelSpec, get_spec
from anomaly.models.layers import AffineCoordinateDecoder, Sampling

__all__ = ["MODELS", "AffineCoordinateDecoder", "Autoencoder", "ModelSpec", "Sampling", "get_spec"]
