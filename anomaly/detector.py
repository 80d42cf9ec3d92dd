"""``Detector``: an autoencoder anomaly detector with a scikit-learn-style interface.

Hyper-parameters are set only in ``__init__``; ``fit`` learns from normal images and returns
``self``; fitted state ends in ``_``. Scores follow one sign convention everywhere: **higher =
more anomalous**, and an image is anomalous at an operating point when ``score > threshold``.

>>> det = Detector("conv-ae", epochs=20).fit(x_normal)          # doctest: +SKIP
>>> det.score(images)                     # (N,) float64, higher = more anomalous  +SKIP
>>> det.save("models/digits/1"); Detector.load("models/digits/1")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.calibration import Calibration, calibrate, fpr_name
from anomaly.data.images import to_unit_float
from anomaly.errors import ConfigError, expected
from anomaly.models.autoencoder import Autoencoder, get_spec
from anomaly.scoring import LatentKNN, Scorer, check_score_settings


@dataclass
class DetectorOutput:
    """Per-image results of :meth:`Detector.detect`.

    Attributes:
        scores: ``(N,)`` anomaly scores, higher = more anomalous.
        normalized: ``(N,)`` in [0, 1], empirical CDF of the normal reference scores.
        is_anomaly: ``(N,)`` bool at ``operating_point``.
        operating_point: name of the operating point used; ``threshold`` its threshold.
        reconstruction, error_map: ``(N, 28, 28)`` float32, when requested.
    """

    scores: np.ndarray
    normalized: np.ndarray
    is_anomaly: np.ndarray
    operating_point: str
    threshold: float
    reconstruction: np.ndarray | None = None
    error_map: np.ndarray | None = None


class Detector:
    """Autoencoder anomaly detector.

    Args:
        model: architecture name (``dense-ae``, ``conv-ae``, ``vae``, ``conv-vae``,
            ``affine-vae``).
        latent_dim, hidden, beta, recon_loss, denoise: network and loss, see
            :class:`~anomaly.models.Autoencoder`.
        score: ``mse``, ``bce``, ``elbo`` (VAEs) or ``mse+knn``; ``None`` for the model's
            default (see :mod:`anomaly.scoring`).
        aggregation: per-pixel error aggregation for ``mse``/``bce``.
        mc_samples: 0 = deterministic score at the posterior mean; > 0 = Monte Carlo.
        knn_k: neighbours of the ``mse+knn`` score.
        knn_memory: at most this many normal training codes kept for ``mse+knn``.
        target_fprs: false-positive rates of the ``fpr@P%`` operating points.
        default_operating_point: name of the default operating point (``fpr@1%`` if ``None``).
        epochs, batch_size, learning_rate, patience, seed: training.

    Fitted attributes: ``model_`` (the Keras model), ``calibration_``, ``history_``.
    """

    def __init__(self, model: str = "conv-vae", *, latent_dim: int | None = None,
                 hidden: list[int] | None = None, beta: float = 1.0, recon_loss: str = "bce",
                 denoise: float = 0.0, score: str | None = None, aggregation: str = "mean",
                 mc_samples: int = 0, knn_k: int = 5, knn_memory: int = 10000,
                 target_fprs: tuple[float, ...] = (0.01,),
                 default_operating_point: str | None = None, epochs: int = 30,
                 batch_size: int = 128, learning_rate: float = 1e-3, patience: int = 5,
                 seed: int = 0):
        self.model = model
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.beta = beta
        self.recon_loss = recon_loss
        self.denoise = denoise
        self.score_name = score
        self.aggregation = aggregation
        self.mc_samples = mc_samples
        self.knn_k = knn_k
        self.knn_memory = knn_memory
        self.target_fprs = tuple(target_fprs)
        self.default_operating_point = default_operating_point
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.seed = seed

    # -- configuration ----------------------------------------------------------------------

    def get_params(self) -> dict:
        """Hyper-parameters, as passed to ``__init__`` (``score`` resolved to its default).

        Read from ``__init__``'s signature, so a new hyper-parameter needs no second list.
        """
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        params = {n: getattr(self, n) for n in names if n != "score"}
        params["score"] = self.resolved_score
        params["hidden"] = list(self.hidden) if self.hidden else None
        params["target_fprs"] = list(self.target_fprs)
        return params

    @property
    def resolved_score(self) -> str:
        return self.score_name or get_spec(self.model).score

    def check_params(self) -> None:
        """Raise ConfigError for a hyper-parameter that is out of range or of the wrong type."""
        get_spec(self.model)
        for name, lo in (("epochs", 1), ("batch_size", 1), ("patience", 0), ("knn_k", 1),
                         ("knn_memory", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise expected(f"{name} as an integer >= {lo}", repr(v), cls=ConfigError)
        if not (isinstance(self.learning_rate, int | float) and 0 < self.learning_rate < 1):
            raise expected("learning_rate in (0, 1)", repr(self.learning_rate), cls=ConfigError)
        if not (isinstance(self.beta, int | float) and self.beta >= 0):
            raise expected("beta >= 0", repr(self.beta), cls=ConfigError)
        if not (isinstance(self.denoise, int | float) and 0 <= self.denoise <= 1):
            raise expected("denoise (noise std) in [0, 1]", repr(self.denoise), cls=ConfigError)
        if self.latent_dim is not None and not (isinstance(self.latent_dim, int)
                                                and self.latent_dim >= 1):
            raise expected("latent_dim as an integer >= 1 (or unset for the model's default)",
                           repr(self.latent_dim), cls=ConfigError)
        if self.hidden is not None and not (
                len(self.hidden) and all(isinstance(h, int) and h >= 1 for h in self.hidden)):
            raise expected("hidden as a list of integers >= 1 (or unset for the default)",
                           repr(self.hidden), cls=ConfigError)
        fprs = self.target_fprs
        if not fprs or not all(isinstance(f, int | float) and 0 < f < 1 for f in fprs):
            raise expected("target FPRs in (0, 1), e.g. 0.01", repr(list(fprs)),
                           cls=ConfigError)
        names = {fpr_name(f) for f in fprs} | {"f1-max", "youden"}
        if self.default_operating_point not in (None, *names):
            raise expected(f"a default operating point in {sorted(names)}",
                           repr(self.default_operating_point), cls=ConfigError)

    def _build(self) -> Autoencoder:
        return Autoencoder(self.model, latent_dim=self.latent_dim, hidden=self.hidden,
                           beta=self.beta, recon_loss=self.recon_loss, denoise=self.denoise,
                           seed=self.seed)

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, x: np.ndarray, x_val: np.ndarray | None = None, *,
            calibration_anomalies: np.ndarray | None = None, val_fraction: float = 0.1,
            backup_dir: str | Path | None = None, verbose: int = 0, callbacks=(),
            distribute: str = "auto") -> Detector:
        """Train on normal images and calibrate the thresholds.

        Args:
            x: normal training images ``(n, 28, 28)`` (any input :func:`to_unit_float` takes).
            x_val: normal validation images ``(n_val, 28, 28)`` for early stopping and
                calibration; when ``None``, ``val_fraction`` of ``x`` is held out.
            calibration_anomalies: labelled anomalies ``(n_cal, 28, 28)`` that add the
                ``f1-max`` and ``youden`` operating points. Never test data.
            backup_dir: per-epoch state for resuming an interrupted fit.
            distribute: ``auto``, ``none``, ``mirrored`` or ``multi-worker``; see
                :func:`anomaly.training.choose_strategy`.

        Returns:
            self
        """
        from anomaly.training import choose_strategy, make_strategy, set_seed, train

        self.check_params()
        x = to_unit_float(x, what="training images")
        if x_val is None:
            rng = np.random.default_rng(self.seed)
            idx = rng.permutation(len(x))
            n_val = max(2, round(len(x) * val_fraction))
            x, x_val = x[idx[n_val:]], x[idx[:n_val]]
        else:
            x_val = to_unit_float(x_val, what="validation images")
        self.strategy_ = choose_strategy(distribute)
        strategy = make_strategy(self.strategy_)
        set_seed(self.seed)
        with strategy.scope():
            model = self._build()
            check_score_settings(model, self.resolved_score, self.aggregation, self.mc_samples)
            self.history_ = train(model, x, x_val, epochs=self.epochs,
                                  batch_size=self.batch_size, learning_rate=self.learning_rate,
                                  patience=self.patience, backup_dir=backup_dir,
                                  verbose=verbose, callbacks=list(callbacks))
        self.model_ = model
        self._scorer = None
        self.knn_ = None
        if self.resolved_score == "mse+knn":
            self.knn_ = self._fit_knn(x, x_val)
        self.calibrate(x_val, calibration_anomalies)
        return self

    def _fit_knn(self, x: np.ndarray, x_val: np.ndarray) -> LatentKNN:
        """Keep normal training codes and standardize both score parts on ``x_val``."""
        if len(x) > self.knn_memory:
            x = x[np.sort(np.random.default_rng(self.seed).permutation(len(x))[: self.knn_memory])]
        knn = LatentKNN(self.encode(x).astype(np.float32), k=self.knn_k)
        parts = Scorer(self.model_, "mse+knn", self.aggregation, knn=knn).knn_components(x_val)
        mean, std = parts.mean(axis=0), np.maximum(parts.std(axis=0), 1e-6)
        knn.stats = [float(mean[0]), float(std[0]), float(mean[1]), float(std[1])]
        return knn

    def calibrate(self, x_normal: np.ndarray, x_anomalies: np.ndarray | None = None) -> Detector:
        """(Re)calibrate thresholds on normal images ``(n, 28, 28)`` and optional anomalies."""
        normal_scores = self.score(x_normal)
        anomaly_scores = self.score(x_anomalies) if x_anomalies is not None else None
        default = self.default_operating_point or fpr_name(self.target_fprs[0])
        self.calibration_: Calibration = calibrate(normal_scores, anomaly_scores,
                                                   target_fprs=self.target_fprs, default=default)
        return self

    # -- scoring ------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise expected("a fitted Detector (call fit() or Detector.load())", "unfitted",
                           cls=ConfigError)

    @property
    def scorer(self) -> Scorer:
        self._check_fitted()
        if getattr(self, "_scorer", None) is None:
            self._scorer = Scorer(self.model_, self.resolved_score, self.aggregation,
                                  self.mc_samples, knn=getattr(self, "knn_", None))
        return self._scorer

    def score(self, images) -> np.ndarray:
        """Anomaly scores ``(N,)`` for images ``(N, 28, 28)``; higher = more anomalous."""
        return self.scorer(to_unit_float(images)).scores

    def detect(self, images, *, operating_point: str | None = None,
               reconstruction: bool = False, error_map: bool = False,
               validated: bool = False) -> DetectorOutput:
        """Scores, normalized scores and decisions (plus optional reconstructions) for images.

        Args:
            images: ``(N, 28, 28)`` or anything :func:`to_unit_float` accepts.
            operating_point: a name from ``calibration_.operating_points``; default if ``None``.
            validated: the images are already float32 ``(N, 28, 28)`` in [0, 1].
        """
        self._check_fitted()
        op = self.calibration_.get(operating_point)
        x = images if validated else to_unit_float(images)
        out = self.scorer(x, reconstruction=reconstruction, error_map=error_map)
        return DetectorOutput(out.scores, self.calibration_.normalize(out.scores),
                              out.scores > op.threshold, op.name, op.threshold,
                              out.reconstruction, out.error_map)

    def predict(self, images, operating_point: str | None = None) -> np.ndarray:
        """``(N,)`` bool, True = anomalous at the operating point."""
        return self.detect(images, operating_point=operating_point).is_anomaly

    def normalized_score(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> ``(N,)`` in [0, 1]; see :meth:`Calibration.normalize`."""
        self._check_fitted()
        return self.calibration_.normalize(scores)

    def reconstruct(self, images, *, normalize: bool = False) -> np.ndarray:
        """Reconstructions ``(N, 28, 28)`` in [0, 1] (decoded at the posterior mean).

        ``normalize=True`` (``affine-vae``): decode with the identity transform.
        """
        self._check_fitted()
        from keras import ops

        x = to_unit_float(images)
        out = []
        for start in range(0, len(x), 1024):
            z, _ = self.model_.encode(x[start : start + 1024])
            out.append(ops.convert_to_numpy(ops.sigmoid(self.model_.decode_logits(z, normalize))))
        return np.concatenate(out)

    def encode(self, images) -> np.ndarray:
        """Latent codes ``(N, code_dim)`` (posterior means for VAEs)."""
        self._check_fitted()
        from keras import ops

        x = to_unit_float(images)
        return np.concatenate([ops.convert_to_numpy(self.model_.encode(x[i : i + 1024])[0])
                               for i in range(0, len(x), 1024)])

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path, **metadata) -> Path:
        """Write a verified artifact directory at ``path`` (atomically); see
        :mod:`anomaly.artifact`."""
        from anomaly.artifact import save_detector

        self._check_fitted()
        return save_detector(self, path, **metadata)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Detector:
        """Load an artifact directory written by :meth:`save` (manifest checked first)."""
        from anomaly.artifact import load_detector

        return load_detector(path, verify=verify)
