"""Anomaly scores from a trained autoencoder. Higher score = more anomalous, everywhere.

A score is computed in two steps, so nothing is hidden:

1. The **raw parts** of each image, computed by the network (:meth:`Scorer.parts`), each
   ``(N,)``:

   - ``mse``: squared error between image and reconstruction, aggregated over pixels.
   - ``bce``: the Bernoulli negative log-likelihood of each pixel minus its minimum (the pixel's
     own entropy), i.e. the binary KL divergence ``KL(Bern(x) || Bern(x_hat))``: zero for a
     perfect reconstruction whatever the image's amount of ink. Raw cross-entropy is not used
     because its floor differs from image to image, which cost 9-11 AUROC points on MNIST
     digits 2 and 3 (bench/score_ablation.py).
   - ``elbo``: the negative evidence lower bound of a VAE, ``sum(bce) + beta * KL(q(z|x) ||
     p(z))`` (with the same per-image constant removed), at the posterior mean ``z = mu(x)``;
     with ``mc_samples > 0`` the reconstruction term is averaged over samples ``z ~ q(z|x)``.
   - ``mse+knn`` has two parts: ``log_mse``, the log of the aggregated squared error, and
     ``log_knn``, the log of the mean squared distance from the image's code to its ``k``
     nearest codes of normal training images (latent-space density, in the spirit of LSA).
     The logs make both parts roughly Gaussian on normal data.
   - ``mse+knn+tp`` adds ``log_tp``, transformation prediction (in the spirit of GEOM and
     GOAD): the log of the mean negative log-likelihood that the model's classifier network
     gives each transform of the image (:meth:`Autoencoder.transform_nll
     <anomaly.models.autoencoder.Autoencoder.transform_nll>`): the classifier learned on normal
     images which way up they are, which an image of another kind does not show. It fails on
     other images than the first two parts (seed 0, MNIST 2: 0.971 for mse+knn, 0.918 for
     the classifier's part alone, 0.985 together; README "Benchmarks").

2. The **combination** into one score: a single part is the score; several parts are summed
   after a :class:`Standardizer` fitted on normal validation images turns each into a z-score,
   ``(log_mse - m1) / s1 + (log_knn - m2) / s2``. An anomaly that the decoder happens to
   reconstruct well still lands far from the normal codes.

A model trained for attribute restoration (``transforms``, :mod:`anomaly.models.transforms`)
is scored on every transform of the image: the per-pixel error map is the mean over the
transforms of the restoration errors against the image, the reconstruction is the restoration
of the image itself, and the latent code (for ``log_knn``) is the image's own.

Aggregations over the per-pixel errors: ``mean``, ``sum``, ``max`` and ``top10`` (mean of the
largest 10% of pixel errors, a fraction of the image's pixels, which favours small, local
defects).

A score does not depend on what else is in the batch: batches are zero-padded to a multiple of
:data:`ROW_BLOCK` images, the kNN distances of the nearest candidates are recomputed as exact
differences (the ``|z|^2 - 2 z.m + |m|^2`` expansion that finds them cancels catastrophically
for near neighbours in float32), and the combination runs in float64 outside the graph. The
inference path is one ``tf.function`` per output set with a fixed input signature, so a call
costs one graph execution per batch.
"""

from __future__ import annotations

from anomaly._tf import tf  # first: TensorFlow without its start-up noise

# isort: split

import functools
import math
from dataclasses import dataclass

import numpy as np
from keras import ops

from anomaly.config import default_of
from anomaly.errors import ConfigError, expected
from anomaly.models import networks
from anomaly.models.autoencoder import Autoencoder
from anomaly.models.transforms import TRANSFORMS, all_transforms

SCORES = ("mse", "bce", "elbo", "mse+knn", "mse+knn+tp")
AGGREGATIONS = ("mean", "sum", "max", "top10")
#: The raw parts of each score, in the order :meth:`Scorer.parts` returns them.
PARTS = {"mse": ("mse",), "bce": ("bce",), "elbo": ("elbo",),
         "mse+knn": ("log_mse", "log_knn"), "mse+knn+tp": ("log_mse", "log_knn", "log_tp")}
#: The scores with a latent kNN part.
KNN_SCORES = ("mse+knn", "mse+knn+tp")
#: Fraction of the pixels averaged by the ``top10`` aggregation.
TOP_FRACTION = 0.1
#: Every graph execution gets a multiple of this many images (zero-padded): TensorFlow's CPU
#: kernels compute a row differently for 1-3 rows than for a multiple of 4, so without padding a
#: score would depend on its batch (measured: 5e-5 relative between batch sizes 1 and 64).
ROW_BLOCK = 8
#: Pixel values per graph execution at most, which bounds the activations' memory: large images
#: are scored in smaller batches (28x28: 1,024 images; 128x128x3: 16). Scoring 900 128x128x3
#: images in one batch of 1,024 took the peak memory of a fit from 2.65 to 5.96 GiB.
PIXEL_BUDGET = 1 << 20


def padded_rows(n: int, step: int) -> int:
    """The batch size a chunk of ``n`` images (``n <= step``) is padded to before it runs.

    A multiple of :data:`ROW_BLOCK` up to 64, then four sizes per doubling (64, 80, 96, 112,
    128, 160, ...), never above ``step``: at most 25% padding, and about 24 distinct shapes
    for a step of 1,024 instead of 128. Each new input shape costs TensorFlow's CPU kernels
    memory they keep (measured: 1,200 calls at every multiple of 8 up to 1,024 grew a process
    by 167 MiB, still growing slowly when a 10-minute service soak ended; at powers of two
    only, 10 MiB, all of it in the first 200 calls).
    """
    size = -(-n // ROW_BLOCK) * ROW_BLOCK
    if size > 64:
        quarter = 1 << (size.bit_length() - 3)  # a quarter of the power of two below size
        size = -(-size // quarter) * quarter
    return min(size, step)


#: Extra nearest-neighbour candidates kept from the fast expansion before the exact recompute.
_KNN_MARGIN = 16


@dataclass
class ScoreOutput:
    """Result of scoring N images.

    Attributes:
        scores: ``(N,)`` float64 anomaly scores, higher = more anomalous.
        parts: ``(N, P)`` float64 raw parts (:data:`PARTS` names their columns).
        reconstruction: ``(N, H, W, C)`` float32 in [0, 1], or ``None`` if not requested.
        error_map: ``(N, H, W, C)`` float32 per-pixel error, or ``None`` if not requested.
    """

    scores: np.ndarray
    parts: np.ndarray
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
    if score == "mse+knn+tp" and getattr(model, "predict_transforms", "none") == "none":
        raise expected("a model trained with transformation prediction for the 'mse+knn+tp' "
                       "score", f"{model.architecture} without it", cls=ConfigError)
    if mc_samples and getattr(model, "transforms", "none") != "none":
        raise expected("mc_samples 0 for a restoration model (transforms)",
                       f"mc_samples={mc_samples}", cls=ConfigError)


def _bernoulli_kl(x, logits):
    """Per-pixel ``BCE(x, sigmoid(logits)) - H(x)`` >= 0, numerically stable."""
    bce = ops.relu(logits) - logits * x + ops.log1p(ops.exp(-ops.abs(logits)))
    xc = ops.clip(x, 1e-7, 1.0 - 1e-7)
    entropy = -(xc * ops.log(xc) + (1.0 - xc) * ops.log(1.0 - xc))
    return ops.maximum(bce - entropy, 0.0)


@dataclass
class LatentKNN:
    """The latent memory of the ``mse+knn`` score.

    Attributes:
        memory: codes of normal training images, ``(n_memory, code_dim)`` float32.
        k: neighbours averaged.
    """

    memory: np.ndarray
    k: int = 5


@dataclass
class Standardizer:
    """Turns raw parts ``(N, P)`` into one score: the sum of their z-scores.

    Attributes:
        mean, std: per part, measured on normal validation images (``std`` floored at 1e-6).
    """

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, parts: np.ndarray) -> Standardizer:
        """Measure ``(N, P)`` raw parts of normal images."""
        parts = np.asarray(parts, dtype=np.float64)
        return cls([float(v) for v in parts.mean(axis=0)],
                   [float(max(v, 1e-6)) for v in parts.std(axis=0)])

    def combine(self, parts: np.ndarray) -> np.ndarray:
        """``(N, P)`` raw parts -> ``(N,)`` float64 scores."""
        parts = np.asarray(parts, dtype=np.float64)
        return ((parts - np.asarray(self.mean)) / np.asarray(self.std)).sum(axis=1)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict) -> Standardizer:
        return cls([float(v) for v in data["mean"]], [float(v) for v in data["std"]])


class Scorer:
    """Compiled scoring of images with one model and one score definition.

    Args:
        model: a trained :class:`~anomaly.models.Autoencoder`.
        score: one of :data:`SCORES`.
        aggregation: one of :data:`AGGREGATIONS` (ignored by ``elbo``, which sums).
        mc_samples: 0 for the deterministic posterior-mean score, else Monte Carlo samples.
        knn: the latent memory (required by ``mse+knn``, ignored otherwise).
        standardizer: combines several parts into one score (required to call the scorer for
            ``mse+knn``; :meth:`parts` works without it, which is how it is fitted).
        batch_size: images per graph execution.
    """

    def __init__(self, model: Autoencoder, score: str = default_of("score"),
                 aggregation: str = default_of("aggregation"),
                 mc_samples: int = default_of("mc_samples"), knn: LatentKNN | None = None,
                 standardizer: Standardizer | None = None, batch_size: int = 1024):
        check_score_settings(model, score, aggregation, mc_samples)
        if score in KNN_SCORES and knn is None:
            raise expected(f"a latent memory for the {score!r} score", "none", cls=ConfigError)
        self.model, self.score, self.aggregation = model, score, aggregation
        self.mc_samples, self.batch_size = mc_samples, batch_size
        self.knn, self.standardizer = knn, standardizer
        # Batch norms folded into the classifier's convolutions: the MNIST conv-vae scores the
        # 10,000 test images at 5,724 images/s instead of 5,196 (bench/runtime_bench.py).
        self._tp_net = (networks.fold_batch_norm(model.transform_net)
                        if score == "mse+knn+tp" else None)
        self.part_names = PARTS[score]
        self.image_shape = tuple(model.image_shape)
        self._n_pixels = math.prod(self.image_shape)
        if knn is not None:
            self._memory = tf.constant(np.asarray(knn.memory, np.float32))
            mem64 = np.asarray(knn.memory, np.float64)
            self._memory_sq = tf.constant((mem64 ** 2).sum(1).astype(np.float32))
        spec = [tf.TensorSpec([None, *self.image_shape], tf.float32)]
        # No autograph: the graph has no Python control flow on tensors, and converting its
        # source cost about 0.7 s a trace (`anomaly evaluate` 7.0 s against 6.4 s).
        graph = functools.partial(tf.function, input_signature=spec, autograph=False,
                                  reduce_retracing=True)
        self._parts_only = graph(lambda x: self._graph(x)[0])
        self._parts_loo = graph(lambda x: self._graph(x, True)[0])
        self._full = graph(self._graph)

    def _aggregate(self, err):
        flat = ops.reshape(err, (-1, self._n_pixels))
        if self.aggregation == "mean":
            return ops.mean(flat, axis=1)
        if self.aggregation == "sum":
            return ops.sum(flat, axis=1)
        if self.aggregation == "max":
            return ops.max(flat, axis=1)
        top = max(1, round(TOP_FRACTION * self._n_pixels))
        return ops.mean(ops.top_k(flat, top, sorted=False)[0], axis=1)

    def knn_distance(self, z, leave_one_out: bool = False):
        """Mean squared distance of codes ``(batch, d)`` to their k nearest memory codes.

        The expansion finds candidates fast; their distances are then recomputed as exact
        differences, so an image's distance does not depend on the rest of its batch.
        ``leave_one_out``: the codes are memory members; skip each one's nearest (itself).
        """
        n_memory = int(self._memory.shape[0])
        k = min(self.knn.k, n_memory - 1 if leave_one_out else n_memory)
        approx = (ops.sum(ops.square(z), axis=1, keepdims=True)
                  - 2.0 * ops.matmul(z, ops.transpose(self._memory)) + self._memory_sq[None, :])
        cand = ops.top_k(-approx, min(n_memory, k + _KNN_MARGIN), sorted=False)[1]
        near = ops.take(self._memory, cand, axis=0)  # (batch, candidates, d)
        exact = ops.sum(ops.square(near - z[:, None, :]), axis=2)
        nearest = -ops.top_k(-exact, k + int(leave_one_out), sorted=True)[0]
        return ops.mean(nearest[:, int(leave_one_out):], axis=1)

    def _restore(self, x):
        """Attribute restoration: every transform of ``x`` through the network; the per-pixel
        errors of the restorations against ``x``, averaged over the transforms."""
        m, name = self.model, self.model.transforms
        count = TRANSFORMS[name]
        inputs = ops.reshape(all_transforms(x, name), (-1, *self.image_shape))
        z_all, _ = m.encode(inputs)
        logits = m.decode_logits(z_all)
        target = ops.reshape(ops.repeat(x[None], count, axis=0), (-1, *self.image_shape))
        if self.score in ("mse", *KNN_SCORES):
            err = ops.square(target - ops.sigmoid(logits))
        else:
            err = _bernoulli_kl(target, logits)
        err = ops.mean(ops.reshape(err, (count, -1, *self.image_shape)), axis=0)
        first = ops.shape(x)[0]
        return ops.sigmoid(logits[:first]), err

    def _graph(self, x, leave_one_out: bool = False):
        m = self.model
        z_mean, z_log_var = m.encode(x)
        if m.transforms != "none":
            recon, err = self._restore(x)
            logits = None
        else:
            logits = m.decode_logits(z_mean)
            recon = ops.sigmoid(logits)
            if self.score in ("mse", *KNN_SCORES):
                err = ops.square(x - recon)
            else:
                err = _bernoulli_kl(x, logits)
        if self.score in KNN_SCORES:
            parts = [ops.log(self._aggregate(err) + 1e-12),
                     ops.log(self.knn_distance(z_mean, leave_one_out) + 1e-12)]
            if self.score == "mse+knn+tp":
                parts.append(ops.log(m.transform_nll(x, self._tp_net) + 1e-6))
            return ops.stack(parts, axis=1), recon, err
        if self.score != "elbo":
            return self._aggregate(err)[:, None], recon, err
        if self.mc_samples:
            nll = 0.0
            for _ in range(self.mc_samples):
                lg = m.decode_logits(m.sampler([z_mean, z_log_var]))
                nll += ops.sum(ops.reshape(_bernoulli_kl(x, lg), (-1, self._n_pixels)), axis=1)
            nll = nll / self.mc_samples
        else:
            nll = ops.sum(ops.reshape(err, (-1, self._n_pixels)), axis=1)
        return (nll + m.beta * m.kl_divergence(z_mean, z_log_var))[:, None], recon, err

    def _run(self, images: np.ndarray, full: bool, leave_one_out: bool = False):
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1:] != self.image_shape:
            raise expected(f"images of shape (N, {', '.join(map(str, self.image_shape))})",
                           f"shape {x.shape}", cls=ConfigError)
        parts, recons, errs = [], [], []
        fit = min(self.batch_size, max(1, PIXEL_BUDGET // self._n_pixels))
        step = max(ROW_BLOCK, fit - fit % ROW_BLOCK)
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            rows = padded_rows(n, step)
            if rows > n:
                pad = np.zeros((rows - n, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            batch = tf.constant(chunk)
            if full:
                p, r, e = self._full(batch)
                recons.append(r.numpy()[:n])
                errs.append(e.numpy()[:n])
            else:
                p = (self._parts_loo if leave_one_out else self._parts_only)(batch)
            parts.append(p.numpy()[:n])
        n_parts = len(self.part_names)
        out = np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, n_parts))
        return out, recons, errs

    def parts(self, images: np.ndarray, *, leave_one_out: bool = False) -> np.ndarray:
        """Raw parts ``(N, P)`` float64 of images ``(N, H, W[, C])`` in [0, 1]; columns named
        by ``part_names``.

        ``leave_one_out``: the images are in the kNN memory (training images); their kNN part
        skips their own code, as PyOD's kNN does for its training scores.
        """
        if leave_one_out and self.knn is None:
            leave_one_out = False
        return self._run(images, False, leave_one_out)[0]

    def combine(self, parts: np.ndarray) -> np.ndarray:
        """Raw parts ``(N, P)`` -> scores ``(N,)``."""
        if parts.shape[1] == 1:
            return parts[:, 0].copy()
        if self.standardizer is None:
            raise expected(f"a fitted standardizer to combine the parts {self.part_names}",
                           "none", hint="Detector.fit fits it on normal validation images.",
                           cls=ConfigError)
        return self.standardizer.combine(parts)

    def __call__(self, images: np.ndarray, *, reconstruction: bool = False,
                 error_map: bool = False) -> ScoreOutput:
        """Score images ``(N, H, W[, C])`` float32 in [0, 1]; see :class:`ScoreOutput`."""
        parts, recons, errs = self._run(images, reconstruction or error_map)
        out = ScoreOutput(self.combine(parts), parts)
        if reconstruction:
            out.reconstruction = np.concatenate(recons)
        if error_map:
            out.error_map = np.concatenate(errs)
        return out
