"""Anomaly scores from a trained autoencoder. Higher score = more anomalous, everywhere.

Scores:
- ``mse``: squared error between image and reconstruction, aggregated over pixels.
- ``bce``: the Bernoulli negative log-likelihood of each pixel minus its minimum (the pixel's own
  entropy), i.e. the binary KL divergence ``KL(Bern(x) || Bern(x_hat))``: zero for a perfect
  reconstruction whatever the image's amount of ink. Raw cross-entropy is not used because its
  floor differs from image to image, which cost 9-11 AUROC points on MNIST digits 2 and 3
  (bench/score_ablation.py).
- ``elbo``: the negative evidence lower bound of a VAE, ``sum(bce) + beta * KL(q(z|x) || p(z))``
  (with the same per-image constant removed), computed deterministically at the posterior mean
  ``z = mu(x)``; with ``mc_samples > 0`` the reconstruction term is averaged over that many
  samples ``z ~ q(z|x)`` instead.
- ``mse+knn``: reconstruction error plus latent-space density, in the spirit of latent-space
  models such as LSA: ``(log mse - m1) / s1 + (log knn - m2) / s2``, where ``knn`` is the mean
  squared distance from the image's code to its ``k`` nearest codes of normal training images,
  and ``m``/``s`` standardize each part on the normal validation images. An anomaly that the
  decoder happens to reconstruct well still lands far from the normal codes.

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

SCORES = ("mse", "bce", "elbo", "mse+knn")
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


def _bernoulli_kl(x, logits):
    """Per-pixel ``BCE(x, sigmoid(logits)) - H(x)`` >= 0, numerically stable."""
    bce = ops.relu(logits) - logits * x + ops.log1p(ops.exp(-ops.abs(logits)))
    xc = ops.clip(x, 1e-7, 1.0 - 1e-7)
    entropy = -(xc * ops.log(xc) + (1.0 - xc) * ops.log(1.0 - xc))
    return ops.maximum(bce - entropy, 0.0)


@dataclass
class LatentKNN:
    """What the ``mse+knn`` score needs besides the network.

    Attributes:
        memory: codes of normal training images, ``(n_memory, code_dim)`` float32.
        k: neighbours averaged.
        stats: ``[m1, s1, m2, s2]``, mean and std of ``log mse`` and ``log knn`` on normal
            validation images; ``None`` while they are being measured.
    """

    memory: np.ndarray
    k: int = 5
    stats: list[float] | None = None


class Scorer:
    """Compiled scoring of images with one model and one score definition.

    Args:
        model: a trained :class:`~anomaly.models.Autoencoder`.
        score: one of :data:`SCORES`.
        aggregation: one of :data:`AGGREGATIONS` (ignored by ``elbo``, which sums).
        mc_samples: 0 for the deterministic posterior-mean score, else Monte Carlo samples.
        knn: the latent memory for ``mse+knn`` (required for it, ignored otherwise).
        batch_size: images per graph execution.
    """

    def __init__(self, model: Autoencoder, score: str = "mse", aggregation: str = "mean",
                 mc_samples: int = 0, knn: LatentKNN | None = None, batch_size: int = 1024):
        check_score_settings(model, score, aggregation, mc_samples)
        if score == "mse+knn" and knn is None:
            raise expected("a latent memory for the 'mse+knn' score", "none", cls=ConfigError)
        self.model, self.score, self.aggregation = model, score, aggregation
        self.mc_samples, self.batch_size = mc_samples, batch_size
        self.knn = knn
        if knn is not None:
            mem = np.asarray(knn.memory, np.float32)
            self._memory = tf.constant(mem)
            self._memory_sq = tf.constant((mem.astype(np.float64) ** 2).sum(1).astype(np.float32))
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

    def knn_distance(self, z):
        """Mean squared distance of codes ``(batch, d)`` to their k nearest memory codes."""
        d2 = (ops.sum(ops.square(z), axis=1, keepdims=True) - 2.0 * ops.matmul(z, ops.transpose(
            self._memory)) + self._memory_sq[None, :])
        k = min(self.knn.k, int(self._memory.shape[0]))
        nearest = -ops.top_k(-d2, k, sorted=False)[0]
        return ops.mean(ops.maximum(nearest, 0.0), axis=1)

    def _graph(self, x):
        m = self.model
        z_mean, z_log_var = m.encode(x)
        logits = m.decode_logits(z_mean)
        recon = ops.sigmoid(logits)
        if self.score in ("mse", "mse+knn"):
            err = ops.square(x - recon)
        else:
            err = _bernoulli_kl(x, logits)
        if self.score == "mse+knn":
            # The logs make both parts roughly Gaussian on normal data, so a z-score sum is fair.
            log_r = ops.log(self._aggregate(err) + 1e-12)
            log_d = ops.log(self.knn_distance(z_mean) + 1e-12)
            if self.knn.stats is None:
                return ops.stack([log_r, log_d], axis=1), recon, err
            m1, s1, m2, s2 = self.knn.stats
            return (log_r - m1) / s1 + (log_d - m2) / s2, recon, err
        if self.score != "elbo":
            return self._aggregate(err), recon, err
        if self.mc_samples:
            nll = 0.0
            for _ in range(self.mc_samples):
                lg = m.decode_logits(m.sampler([z_mean, z_log_var]))
                nll += ops.sum(_bernoulli_kl(x, lg), axis=(1, 2))
            nll = nll / self.mc_samples
        else:
            nll = ops.sum(err, axis=(1, 2))
        return nll + m.beta * m.kl_divergence(z_mean, z_log_var), recon, err

    def knn_components(self, images: np.ndarray) -> np.ndarray:
        """``(N, 2)``: log reconstruction error and log kNN distance, before standardizing."""
        if self.knn is None or self.knn.stats is not None:
            raise ConfigError("knn_components needs an mse+knn scorer without stats yet.")
        return self(images).scores

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
