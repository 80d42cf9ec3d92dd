"""The autoencoder model: one ``keras.Model`` for the whole family, with its own training step.

Following keras-io's ``examples/generative/vae.py``: a :class:`~anomaly.models.layers.Sampling`
layer, ``train_step``/``test_step`` that compute the loss explicitly, and loss trackers, so
``fit`` reports ``loss``, ``reconstruction_loss`` and ``kl_loss`` (zero for plain autoencoders).
The architecture is rebuilt from ``get_config`` on load, so ``.keras`` files load in safe mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf
from keras import ops

from anomaly.config import default_of
from anomaly.errors import ConfigError, expected
from anomaly.models import networks
from anomaly.models.layers import PACKAGE, Sampling
from anomaly.models.transforms import (
    TRANSFORMS,
    all_transforms,
    check_transforms,
    labelled_transform,
    random_transform,
    stroke_jitter,
)

RECON_LOSSES = ("bce", "mse")


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model NAME`` builds.

    Attributes:
        name: registry name.
        description: one line for ``anomaly models --available`` and the README.
        variational: Gaussian latent with KL term (and an ELBO score).
        hidden: default widths: dense units, or conv filters.
        latent_dim: default code size (content units for ``affine-vae``).
    """

    name: str
    description: str
    variational: bool
    hidden: tuple[int, ...]
    latent_dim: int


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("dense-ae", "Dense autoencoder pixels-512-128-code", False, (512, 128), 32),
        ModelSpec("conv-ae", "Convolutional autoencoder (Conv2D encoder, Conv2DTranspose "
                  "decoder)", False, (32, 64), 32),
        ModelSpec("vae", "Dense variational autoencoder (Gaussian latent, BCE + beta*KL)", True,
                  (512, 256), 16),
        ModelSpec("conv-vae", "Convolutional variational autoencoder", True, (32, 64), 16),
        ModelSpec("affine-vae", "VAE with a coordinate-network decoder and 6 affine latent "
                  "units (rotation/shear/scale/shift removed in the normalized reconstruction)",
                  True, (32, 64), 10),
    )
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise expected(f"a model in {sorted(MODELS)}", repr(name),
                       hint="Run 'anomaly models --available' to list them.", cls=ConfigError)
    return MODELS[name]


@keras.saving.register_keras_serializable(package=PACKAGE)
class Autoencoder(keras.Model):
    """Encoder + decoder + loss for one architecture of the family.

    Args:
        architecture: a name in :data:`MODELS`.
        image_shape: ``(H, W, C)`` of the images (from the data set).
        latent_dim: code size (for ``affine-vae``: content units; 6 affine units are added).
        hidden: dense widths or conv filters; ``None`` for the architecture's default.
        beta: weight of the KL term (variational models only).
        recon_loss: ``"bce"`` (Bernoulli likelihood) or ``"mse"`` (summed squared error).
        denoise: standard deviation of Gaussian noise added to training inputs (0 = off).
        stroke_jitter: training images get thicker or thinner strokes by up to this
            (:func:`~anomaly.models.transforms.stroke_jitter`; 0 = off), for every part the
            model trains (autoencoder and classifier); validation sees the images as they are.
        transforms: attribute restoration (:mod:`anomaly.models.transforms`): ``"none"``,
            ``"rot4"`` or ``"flip4"``.
        predict_transforms: transformation prediction: ``"none"``, or the transforms
            (``"rot4"``, ``"flip4"``) a classifier network (:func:`networks.transform_classifier`)
            learns to recognize on the training images, trained in the same steps (its
            cross-entropy is added to the loss; it shares no weights with the autoencoder).
        tp_filters: that classifier's filters, one convolution a stage (``None``: the default).
        tp_design: that classifier's layout (:data:`networks.TP_DESIGN`, the current one, for a
            new model; a saved model's config names its own, 1 when it predates the key).
        seed: seed of the sampling and noise generators.

    Inputs are images ``(batch, H, W, C)`` in [0, 1]; ``call`` returns reconstructions of the
    same shape (the posterior mean is decoded unless ``training=True``).
    """

    def __init__(self, architecture: str, image_shape: tuple[int, int, int],
                 latent_dim: int | None = None,
                 hidden: list[int] | tuple[int, ...] | None = None,
                 beta: float = default_of("beta"), recon_loss: str = default_of("recon_loss"),
                 denoise: float = default_of("denoise"),
                 stroke_jitter: float = default_of("stroke_jitter"),
                 transforms: str = default_of("transforms"), predict_transforms: str = "none",
                 tp_filters: list[int] | tuple[int, ...] | None = None,
                 tp_design: int = networks.TP_DESIGN, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        spec = get_spec(architecture)
        if recon_loss not in RECON_LOSSES:
            raise expected(f"a reconstruction loss in {RECON_LOSSES}", repr(recon_loss),
                           cls=ConfigError)
        self.architecture = architecture
        self.image_shape = tuple(int(v) for v in image_shape)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise expected("an image shape (H, W, C) of positive sizes", repr(image_shape),
                           cls=ConfigError)
        shape = self.image_shape
        self.variational = spec.variational
        self.latent_dim = int(latent_dim or spec.latent_dim)
        self.hidden = tuple(int(h) for h in (hidden or spec.hidden))
        self.beta, self.recon_loss, self.denoise, self.seed = float(beta), recon_loss, float(
            denoise), seed
        self.stroke_jitter = float(stroke_jitter)
        check_transforms(transforms, self.image_shape)
        self.transforms = transforms
        if self.latent_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise expected("a positive latent_dim and positive hidden sizes",
                           f"latent_dim={latent_dim}, hidden={hidden}", cls=ConfigError)
        code = self.latent_dim + (6 if architecture == "affine-vae" else 0)
        if architecture in ("dense-ae", "vae"):
            self.encoder = networks.dense_encoder(shape, code, self.hidden, self.variational)
            self.decoder = networks.dense_decoder(shape, code, self.hidden)
        elif architecture in ("conv-ae", "conv-vae"):
            self.encoder = networks.conv_encoder(shape, code, self.hidden, self.variational)
            self.decoder = networks.conv_decoder(shape, code, self.hidden)
        else:
            self.encoder = networks.conv_encoder(shape, code, self.hidden, True, dense_units=256)
            self.decoder = networks.affine_decoder(shape, code, units=128, depth=3)
        self.code_dim = code
        self.tp_filters = tuple(int(f) for f in (tp_filters or default_of("tp_filters")))
        self.tp_design = int(tp_design)
        if predict_transforms != "none":
            check_transforms(predict_transforms, self.image_shape)
            self.transform_net = networks.transform_classifier(
                shape, TRANSFORMS[predict_transforms], self.tp_filters, self.tp_design)
        self.predict_transforms = predict_transforms
        self.tp_gen = keras.random.SeedGenerator(None if seed is None else seed + 3)
        self.sampler = Sampling(seed=seed, name="sampling")
        self.noise_gen = keras.random.SeedGenerator(None if seed is None else seed + 1)
        self.transform_gen = keras.random.SeedGenerator(None if seed is None else seed + 2)
        self.jitter_gen = keras.random.SeedGenerator(None if seed is None else seed + 4)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.recon_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")
        self.tp_tracker = keras.metrics.Mean(name="transform_loss")
        self.built = True  # encoder and decoder are functional models, built above

    def build(self, input_shape=None):
        self.built = True

    # -- the network ------------------------------------------------------------------------

    def encode(self, x, training: bool = False):
        """Images ``(batch, H, W, C)`` -> ``(z_mean, z_log_var)``, each ``(batch, code_dim)``.

        ``z_log_var`` is ``None`` for plain autoencoders.
        """
        out = self.encoder(x, training=training)
        return (out[0], out[1]) if self.variational else (out, None)

    def decode_logits(self, z, normalize: bool = False):
        """Codes ``(batch, code_dim)`` -> pixel logits ``(batch, H, W, C)``.

        ``normalize=True`` (``affine-vae`` only) decodes with the identity transform.
        """
        if normalize:
            if self.architecture != "affine-vae":
                raise expected("the affine-vae model for a normalized reconstruction",
                               self.architecture, cls=ConfigError)
            return self.decoder.get_layer("coord_net")(z, normalize=True)
        return self.decoder(z)

    def decode_logits_at(self, z, scale: int, normalize: bool = False):
        """Codes ``(batch, code_dim)`` -> logits ``(batch, scale*H, scale*W, C)``: the
        ``affine-vae``'s coordinate decoder evaluated on a ``scale`` times finer pixel grid
        over the same extent (its weights see coordinates, not pixels)."""
        if self.architecture != "affine-vae":
            raise expected("an affine-vae model to decode at another size (its coordinate "
                           "decoder is resolution-free)", self.architecture, cls=ConfigError)
        if scale == 1:
            return self.decode_logits(z, normalize)
        from anomaly.models.layers import AffineCoordinateDecoder

        trained = self.decoder.get_layer("coord_net")
        config = {**trained.get_config(), "height": trained.height * scale,
                  "width": trained.width * scale, "name": f"coord_net_x{scale}"}
        finer = AffineCoordinateDecoder.from_config(config)
        finer.build(z.shape)
        finer.set_weights(trained.get_weights())
        return finer(z, normalize=normalize)

    def call(self, x, training: bool = False):
        z_mean, z_log_var = self.encode(x, training=training)
        z = self.sampler([z_mean, z_log_var]) if training and self.variational else z_mean
        return ops.sigmoid(self.decode_logits(z))

    def transform_nll(self, x, net=None):
        """Transformation prediction's part: the mean over the transforms ``t`` of
        ``-log p(t | t(x))`` under the classifier, ``(batch,)`` for images ``(batch, H, W, C)``.

        ``net``: the classifier to use instead of ``transform_net`` (the scorer passes its
        batch-norm-folded copy, :func:`networks.fold_batch_norm`).
        """
        count = TRANSFORMS[self.predict_transforms]
        net = self.transform_net if net is None else net
        logits = net(ops.reshape(all_transforms(x, self.predict_transforms),
                                 (-1, *self.image_shape)), training=False)
        logits = ops.reshape(logits, (count, -1, count))  # (transform applied, batch, class)
        # -log p(t) = log(1 + sum_{j != t} exp(l_j - l_t)): exact where p(t) is near 1, where
        # log_softmax's l_t - logsumexp(l) cancels to a few ulps of the logits.
        own = []
        for t in range(count):
            rest = ops.concatenate([logits[t, :, :t], logits[t, :, t + 1:]], axis=-1)
            own.append(ops.log1p(ops.sum(ops.exp(rest - logits[t, :, t : t + 1]), axis=-1)))
        return ops.mean(ops.stack(own, axis=0), axis=0)

    def _transform_loss(self, x, training: bool):
        """Mean cross-entropy of the classifier: on one random transform of each image while
        training (as restoration draws its inputs), on every transform when validating."""
        count = TRANSFORMS[self.predict_transforms]
        if training:
            x_t, label = labelled_transform(x, self.predict_transforms, self.tp_gen)
        else:
            x_t = ops.reshape(all_transforms(x, self.predict_transforms), (-1, *self.image_shape))
            label = ops.repeat(ops.arange(count), ops.shape(x)[0])
        logits = ops.cast(self.transform_net(x_t, training=training), "float32")
        ce = keras.losses.sparse_categorical_crossentropy(label, logits, from_logits=True)
        return ops.where(ops.shape(ce)[0] > 0, ops.mean(ce), 0.0)

    # -- the loss -----------------------------------------------------------------------------

    def pixel_losses(self, x, logits):
        """Per-pixel reconstruction loss ``(batch, H, W, C)`` for targets ``x`` in [0, 1]."""
        logits = ops.cast(logits, "float32")
        if self.recon_loss == "bce":
            # Numerically stable binary cross-entropy from logits.
            return ops.relu(logits) - logits * x + ops.log1p(ops.exp(-ops.abs(logits)))
        return ops.square(x - ops.sigmoid(logits))

    @staticmethod
    def kl_divergence(z_mean, z_log_var):
        """KL(q(z|x) || N(0, I)) per image, ``(batch,)``."""
        z_mean, z_log_var = ops.cast(z_mean, "float32"), ops.cast(z_log_var, "float32")
        return -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)

    def compute_losses(self, x, training: bool, noisy: bool | None = None):
        """``(loss, reconstruction_loss, kl_loss, transform_loss)``, means over the batch
        (``transform_loss`` is 0 without transformation prediction).

        ``noisy``: corrupt the inputs (denoising models); default: while training.
        """
        x = ops.cast(x, "float32")
        if training and self.stroke_jitter > 0:
            x = stroke_jitter(x, self.stroke_jitter, self.jitter_gen)
        tp = (self._transform_loss(x, training) if self.predict_transforms != "none"
              else ops.zeros(()))
        if self.transforms != "none":
            # Restoration: the target is the image itself, the input a transformed copy (one
            # drawn at random while training, every one of them for validation).
            if training:
                x_in = random_transform(x, self.transforms, self.transform_gen)
            else:
                stacked = all_transforms(x, self.transforms)
                x_in = ops.reshape(stacked, (-1, *self.image_shape))
                x = ops.reshape(ops.repeat(x[None], TRANSFORMS[self.transforms], axis=0),
                                (-1, *self.image_shape))
        else:
            x_in = x
        if (training if noisy is None else noisy) and self.denoise > 0:
            noise = keras.random.normal(ops.shape(x_in), stddev=self.denoise,
                                        seed=self.noise_gen)
            x_in = ops.clip(x_in + noise, 0.0, 1.0)
        z_mean, z_log_var = self.encode(x_in, training=training)
        if self.variational:
            z = self.sampler([z_mean, z_log_var]) if training else z_mean
            kl = self.kl_divergence(z_mean, z_log_var)
        else:
            z, kl = z_mean, ops.zeros((ops.shape(x)[0],))
        recon = ops.sum(self.pixel_losses(x, self.decode_logits(z)), axis=(1, 2, 3))
        # A multi-replica strategy splits an epoch's last, short batch over the replicas and may
        # give one an empty batch, whose mean is NaN: its losses are 0 here, and _track gives
        # it no weight.
        nonempty = ops.shape(recon)[0] > 0
        recon = ops.where(nonempty, ops.mean(recon), 0.0)
        kl = ops.where(nonempty, ops.mean(kl), 0.0)
        return recon + self.beta * kl + tp, recon, kl, tp

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.recon_tracker, self.kl_tracker]
        return trackers + ([self.tp_tracker] if self.predict_transforms != "none" else [])

    def _track(self, loss, recon, kl, tp, n):
        # An epoch's loss is the mean of its batches' means: each batch weighs 1, an empty one 0.
        weight = ops.cast(ops.minimum(n, 1), "float32")
        for tracker, value in zip(self.metrics, (loss, recon, kl, tp), strict=False):
            tracker.update_state(value, sample_weight=weight)
        results = {m.name: m.result() for m in self.metrics}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3 reduces a step's outputs across workers with reduce("MEAN", axis=0),
            # which fails on scalars (tensorflow/tensorflow#72388): one value per worker makes
            # it the mean over the workers. Epoch logs are read from the metrics themselves.
            results = {k: ops.reshape(v, (1,)) for k, v in results.items()}
        return results

    def train_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, recon, kl, tp = self.compute_losses(x, training=True)
            # Under a multi-replica strategy the replicas' gradients are summed: divide so the
            # step is that of the mean loss over the global batch, as Keras' own train_step does.
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        return self._track(loss, recon, kl, tp, ops.shape(x)[0])

    def test_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        # A denoising model is validated on what it is trained for, noisy inputs against clean
        # targets: on clean inputs early stopping would keep an epoch before it learned to
        # denoise (measured: 4.6x the error on noisy images).
        return self._track(*self.compute_losses(x, training=False, noisy=True), ops.shape(x)[0])

    def get_config(self):
        return {
            **super().get_config(),
            "architecture": self.architecture,
            "image_shape": list(self.image_shape),
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "beta": self.beta,
            "recon_loss": self.recon_loss,
            "denoise": self.denoise,
            "stroke_jitter": self.stroke_jitter,
            "transforms": self.transforms,
            "predict_transforms": self.predict_transforms,
            "tp_filters": list(self.tp_filters),
            "tp_design": self.tp_design,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # A model saved before the key existed has design 1: its weights fit both layouts'
        # shapes, so the default would load them into the wrong one without a word.
        # Likewise a model from before stroke_jitter trained without it.
        config = {"tp_design": 1, "stroke_jitter": 0.0, **config}
        return super().from_config(config, custom_objects=custom_objects)
