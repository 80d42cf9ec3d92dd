"""Anomaly scores from a trained autoencoder. Higher score = more anomalous, everywhere.

Scores:
- ``mse``: squared error between image and reconstruction, aggregated over pixels.
- ``bce``: binary cross-entropy of the image under the decoder's pixel probabilities, aggregated.
- ``elbo``: the negative evidence lower bound of a VAE, ``BCE_sum(x, decode(z)) + beta * KL``,
  computed deterministically at the posterior mean ``z = mu(x)``; with ``mc_samples > 0`` the
  reconstruction term is averaged over that many samples ``z ~ q(z|x)`` instead.

Aggregations over the 28x28 per-pixel errors: ``mean``, ``sum``, ``max`` and ``top10`` (mean of
the largest 10% of pixel errors, which favours small, local defects).

The inference path is one ``tf.function`` per output set with a fixed input signature, so a
call costs one graph execution per batch, without ``model.predict``'s per-call overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from keras import ops

from anomaly.errors import ConfigError, expected
from anomaly.models.autoencoder import Autoencoder

SCORES = ("mse", "bce", "elbo")
AGGREGATIONS = ("mean", "sum", "max", "top10")


@dataclass
class ScoreOutput:
    """Result of scoring N images.

    Attributes:
        scores: ``(N,)`` float64 anomaly scores, higher = more anomalous.
        reconstruction: ``(N, 28, 28)`` float32 in [0, 1], or ``None`` if not requested.
        error_map: ``(N, 28, 28)`` float32 per-pixel error, or ``None`` if not requested.
    """

    scores: np.ndarray
    reconstruction: np.ndarray | None = None
    error_map: np.ndarray | None = None


def check_score_settings(model: Autoencoder, score: str, aggregation: str, mc_samples: int):
    if score not in SCORES:
        raise expected(f"a score in {SCORES}", repr(score), cls=ConfigError)
    if score == "elbo" and not model.variational:
        raise expected("a variational model (vae, conv-vae, affine-vae) for the 'elbo' score",
                       model.architecture, hint="Use --score mse or bce.", cls=ConfigError)
    if aggregation not in AGGREGATIONS:
        raise expected(f"an aggregation in {AGGREGATIONS}", repr(aggregation), cls=ConfigError)
    if not isinstance(mc_samples, int) or mc_samples < 0:
        raise expected("mc_samples as an integer >= 0", repr(mc_samples), cls=ConfigError)


class Scorer:
    """Compiled scoring of images with one model and one score definition.

    Args:
        model: a trained :class:`~anomaly.models.Autoencoder`.
        score: one of :data:`SCORES`.
        aggregation: one of :data:`AGGREGATIONS` (ignored by ``elbo``, which sums).
        mc_samples: 0 for the deterministic posterior-mean score, else Monte Carlo samples.
        batch_size: images per graph execution.
    """

    def __init__(self, model: Autoencoder, score: str = "mse", aggregation: str = "mean",
                 mc_samples: int = 0, batch_size: int = 1024):
        check_score_settings(model, score, aggregation, mc_samples)
        self.model, self.score, self.aggregation = model, score, aggregation
        self.mc_samples, self.batch_size = mc_samples, batch_size
        spec = [tf.TensorSpec([None, 28, 28], tf.float32)]
        self._scores_only = tf.function(lambda x: self._graph(x)[0], input_signature=spec,
                                        reduce_retracing=True)
        self._full = tf.function(self._graph, input_signature=spec, reduce_retracing=True)

    def _aggregate(self, err):
        flat = ops.reshape(err, (-1, 28 * 28))
        if self.aggregation == "mean":
            return ops.mean(flat, axis=1)
        if self.aggregation == "sum":
            return ops.sum(flat, axis=1)
        if self.aggregation == "max":
            return ops.max(flat, axis=1)
        return ops.mean(ops.top_k(flat, 78, sorted=False)[0], axis=1)

    def _graph(self, x):
        m = self.model
        z_mean, z_log_var = m.encode(x)
        logits = m.decode_logits(z_mean)
        recon = ops.sigmoid(logits)
        if self.score == "mse":
            err = ops.square(x - recon)
        else:  # bce and elbo: Bernoulli negative log-likelihood per pixel
            err = ops.relu(logits) - logits * x + ops.log1p(ops.exp(-ops.abs(logits)))
        if self.score != "elbo":
            return self._aggregate(err), recon, err
        if self.mc_samples:
            nll = 0.0
            for _ in range(self.mc_samples):
                lg = m.decode_logits(m.sampler([z_mean, z_log_var]))
                nll += ops.sum(ops.relu(lg) - lg * x + ops.log1p(ops.exp(-ops.abs(lg))),
                               axis=(1, 2))
            nll = nll / self.mc_samples
        else:
            nll = ops.sum(err, axis=(1, 2))
        return nll + m.beta * m.kl_divergence(z_mean, z_log_var), recon, err

    def __call__(self, images: np.ndarray, *, reconstruction: bool = False,
                 error_map: bool = False) -> ScoreOutput:
        """Score images ``(N, 28, 28)`` float32 in [0, 1]; see :class:`ScoreOutput`."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        full = reconstruction or error_map
        scores, recons, errs = [], [], []
        for start in range(0, len(x), self.batch_size):
            batch = tf.constant(x[start : start + self.batch_size])
            if full:
                s, r, e = self._full(batch)
                recons.append(r.numpy())
                errs.append(e.numpy())
            else:
                s = self._scores_only(batch)
            scores.append(s.numpy())
        out = ScoreOutput(np.concatenate(scores).astype(np.float64) if scores else np.zeros(0))
        if reconstruction:
            out.reconstruction = np.concatenate(recons)
        if error_map:
            out.error_map = np.concatenate(errs)
        return out
