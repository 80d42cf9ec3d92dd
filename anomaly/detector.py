"""``Detector``: an autoencoder anomaly detector and a scikit-learn estimator.

It follows scikit-learn's and PyOD's conventions for outlier detectors: hyper-parameters only
through ``__init__`` (the fields of :class:`~anomaly.config.DetectorConfig`, so their defaults are
written once, there), ``fit(X, y=None)`` returns ``self``, fitted state ends in ``_``, and
``clone``, ``get_params``/``set_params`` and ``Pipeline`` work. Scores follow PyOD's sign, one
convention everywhere: **higher = more anomalous**.

- ``decision_function(X)``: the anomaly score ``(N,)``.
- ``predict(X)``: 1 for anomalies, 0 for normal images at the default operating point (the
  single rule :meth:`Calibration.decide <anomaly.calibration.Calibration.decide>`).
- ``score_samples(X)``: scikit-learn's sign (higher = more normal), ``-decision_function``.
- ``detect(X)``: everything the service returns: scores, normalized scores, decisions at any
  operating point, reconstructions and per-pixel error maps.
- After ``fit``: ``threshold_`` (the default operating point's), ``decision_scores_`` and
  ``labels_`` (the training images' scores and decisions, as in PyOD: optimistic, since the
  model was fitted on them, though the kNN part leaves each image's own code out),
  ``calibration_``,
  ``history_``, ``image_shape_``.

The hyper-parameter named ``score`` takes the name that a ``score(X)`` method would have: there
is none (scikit-learn's ``score`` is a goodness-of-fit metric anyway); use ``decision_function``.

>>> det = Detector(model="conv-ae", epochs=20).fit(x_normal)           # doctest: +SKIP
>>> det.decision_function(images)     # (N,) float64, higher = more anomalous  +SKIP
>>> det.save("models/digits/1"); Detector.load("models/digits/1")      # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin

from anomaly.calibration import Calibration, calibrate, fpr_name
from anomaly.config import (
    DETECTOR_FIELDS,
    PRECISIONS,
    DetectorConfig,
    accepts_none,
    default_of,
)
from anomaly.data.images import image_shape_of, to_unit_float, without_channels
from anomaly.data.splits import holdout
from anomaly.data.stream import DiskImages, blockwise
from anomaly.errors import ArtifactError, ConfigError, expected

_log = logging.getLogger(__name__)

_DEFAULT_MODEL = default_of("model")
#: The detector's file format inside an artifact (see :meth:`Detector.save`).
DETECTOR_FORMAT = 2
#: Largest ``reconstruct(scale=...)``: 8x the training size (a 28x28 model decodes 224x224).
MAX_DECODE_SCALE = 8


@dataclass
class DetectorOutput:
    """Per-image results of :meth:`Detector.detect`.

    Attributes:
        scores: ``(N,)`` anomaly scores, higher = more anomalous.
        normalized: ``(N,)`` in [0, 1], empirical CDF of the normal reference scores.
        is_anomaly: ``(N,)`` bool at ``operating_point``.
        operating_point: name of the operating point used; ``threshold`` its threshold.
        reconstruction, error_map: ``(N, H, W)`` (grey) or ``(N, H, W, C)`` float32, when
            requested.
        parts: ``(N, P)`` raw score parts (see :mod:`anomaly.scoring`).
        surprise: ``(N,)`` ``-log10 p`` of the calibration's tail model: keeps ranking far
            anomalies where ``normalized`` saturates at 1.
    """

    scores: np.ndarray
    normalized: np.ndarray
    is_anomaly: np.ndarray
    operating_point: str
    threshold: float
    reconstruction: np.ndarray | None = None
    error_map: np.ndarray | None = None
    parts: np.ndarray | None = None
    surprise: np.ndarray | None = None


class Detector(OutlierMixin, BaseEstimator):
    """Autoencoder anomaly detector.

    Takes every field of :class:`~anomaly.config.DetectorConfig` as a keyword argument (``model``
    also positionally), with the defaults written there; ``Detector.from_config(cfg)`` takes a
    config object.
    """

    def __init__(self, model=_DEFAULT_MODEL, **params):
        # The real signature, with every hyper-parameter, is generated below from
        # DetectorConfig (scikit-learn's get_params reads it), so no default is written twice.
        unknown = sorted(set(params) - set(DETECTOR_FIELDS))
        if unknown:
            raise TypeError(f"Detector got unexpected keyword arguments {unknown}; expected "
                            f"some of {sorted(DETECTOR_FIELDS)}")
        self.model = model
        for name in DETECTOR_FIELDS:
            if name != "model":
                setattr(self, name, params.get(name, default_of(name)))

    @classmethod
    def from_config(cls, config: DetectorConfig) -> Detector:
        return cls(**config.to_dict())

    def config(self) -> DetectorConfig:
        """The hyper-parameters as a :class:`DetectorConfig` (lists copied)."""
        values = {k: (list(v) if isinstance(v, tuple | list) else v)
                  for k, v in self.get_params().items()}
        return DetectorConfig(**values)

    # -- configuration ----------------------------------------------------------------------

    def check_params(self) -> None:
        """Raise ConfigError for a hyper-parameter that is out of range or of the wrong type."""
        from anomaly.models.autoencoder import get_spec
        from anomaly.scoring import AGGREGATIONS, SCORES

        get_spec(self.model)
        for name, f in DETECTOR_FIELDS.items():
            lo = f.metadata["minimum"]
            v = getattr(self, name)
            if lo is None or (v is None and accepts_none(name)):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                unset = " (or unset for the model's default)" if accepts_none(name) else ""
                raise expected(f"{name} as an integer >= {lo}{unset}", repr(v),
                               cls=ConfigError)
        for name, ok, want in (
                ("learning_rate", lambda v: 0 < v < 1, "in (0, 1)"),
                ("beta", lambda v: v >= 0, ">= 0"),
                ("denoise", lambda v: 0 <= v <= 1, "(noise std) in [0, 1]"),
                ("stroke_jitter", lambda v: 0 <= v <= 1, "in [0, 1]"),
                ("val_fraction", lambda v: 0 < v <= 0.5, "in (0, 0.5]")):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and not isinstance(v, bool) and ok(v)):
                raise expected(f"{name} {want}", repr(v), cls=ConfigError)
        if self.score not in SCORES:
            raise expected(f"a score in {SCORES}", repr(self.score), cls=ConfigError)
        if self.aggregation not in AGGREGATIONS:
            raise expected(f"an aggregation in {AGGREGATIONS}", repr(self.aggregation),
                           cls=ConfigError)
        from anomaly.calibration import RULES

        if self.calibration_rule not in RULES:
            raise expected(f"a calibration_rule in {RULES}", repr(self.calibration_rule),
                           cls=ConfigError)
        if not isinstance(self.force_calibration, bool):
            raise expected("force_calibration as true or false", repr(self.force_calibration),
                           cls=ConfigError)
        from anomaly.models.transforms import TP_CHOICES, TRANSFORMS

        if self.transforms not in TRANSFORMS:
            raise expected(f"transforms in {sorted(TRANSFORMS)}", repr(self.transforms),
                           cls=ConfigError)
        if self.tp_transforms not in TP_CHOICES:
            raise expected(f"tp_transforms in {list(TP_CHOICES)}", repr(self.tp_transforms),
                           cls=ConfigError)
        if self.recon_loss not in ("bce", "mse"):
            raise expected("recon_loss in ('bce', 'mse')", repr(self.recon_loss),
                           cls=ConfigError)
        if self.precision not in PRECISIONS:
            raise expected(f"a precision in {PRECISIONS}", repr(self.precision),
                           cls=ConfigError)
        if self.hidden is not None and not (
                len(self.hidden) and all(isinstance(h, int) and h >= 1 for h in self.hidden)):
            raise expected("hidden as a list of integers >= 1 (or unset for the default)",
                           repr(self.hidden), cls=ConfigError)
        if not (isinstance(self.tp_filters, list | tuple) and len(self.tp_filters) and all(
                isinstance(f, int) and not isinstance(f, bool) and f >= 1
                for f in self.tp_filters)):
            raise expected("tp_filters as a list of integers >= 1, e.g. [16, 32, 64]",
                           repr(self.tp_filters), cls=ConfigError)
        fprs = self.target_fprs
        if not fprs or not all(isinstance(f, int | float) and 0 < f < 1 for f in fprs):
            raise expected("target FPRs in (0, 1), e.g. 0.01", repr(list(fprs or ())),
                           cls=ConfigError)
        names = {fpr_name(f) for f in fprs} | {"f1-max", "youden"}
        if self.default_operating_point not in (None, *names):
            raise expected(f"a default operating point in {sorted(names)}",
                           repr(self.default_operating_point), cls=ConfigError)

    def _build(self, image_shape):
        from anomaly.models.autoencoder import Autoencoder
        from anomaly.models.transforms import resolve_tp_transforms

        predict = (resolve_tp_transforms(self.tp_transforms, image_shape)
                   if self.score == "mse+knn+tp" else "none")
        return Autoencoder(self.model, image_shape, latent_dim=self.latent_dim,
                           hidden=self.hidden, beta=self.beta, recon_loss=self.recon_loss,
                           denoise=self.denoise, stroke_jitter=self.stroke_jitter,
                           transforms=self.transforms,
                           predict_transforms=predict, tp_filters=self.tp_filters,
                           seed=self.seed)

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, X, y=None, *, x_val=None, calibration_anomalies=None,
            backup_dir: str | Path | None = None, verbose: int = 0, callbacks=(),
            distribute: str = "auto") -> Detector:
        """Train on normal images and calibrate the thresholds.

        Args:
            X: normal training images ``(n, H, W)`` or ``(n, H, W, C)`` (any input
                :func:`~anomaly.data.images.to_unit_float` takes, or
                :class:`~anomaly.data.stream.DiskImages`, which are streamed from disk: then
                training reads them batch by batch, and the kNN memory, the hold-out's and the
                training images' scores block by block); they set ``image_shape_``.
            y: ignored (unsupervised), as in PyOD.
            x_val: normal validation images for early stopping and calibration; when ``None``,
                ``val_fraction`` of ``X`` is held out (the same hold-out ``anomaly fit`` makes).
            calibration_anomalies: labelled anomalies that add the ``f1-max`` and ``youden``
                operating points. Never test data.
            backup_dir: per-epoch state for resuming an interrupted fit.
            callbacks: Keras callbacks of the training run; they see the model being trained,
                which under ``precision`` bfloat16 is the mixed one, not ``model_`` (its
                float32 twin, made when training ends).
            distribute: ``auto``, ``none``, ``mirrored`` or ``multi-worker``; see
                :func:`anomaly.training.choose_strategy`.

        Returns:
            self
        """
        from anomaly.scoring import KNN_SCORES, check_score_settings
        from anomaly.training import (
            choose_precision,
            choose_strategy,
            dtype_policy,
            float32_twin,
            make_strategy,
            set_seed,
            train,
        )

        self.check_params()
        x = X if isinstance(X, DiskImages) else to_unit_float(X, what="training images")
        if x_val is None:
            train_idx, val_idx = holdout(len(x), self.val_fraction, self.seed,
                                         self.holdout_run)
            x, x_val = x[train_idx], x[val_idx]
        elif not isinstance(x_val, DiskImages):
            x_val = to_unit_float(x_val, shape=image_shape_of(x), what="validation images")
        elif x_val.image_shape != image_shape_of(x):
            raise expected(f"validation images of the training images' shape "
                           f"{image_shape_of(x)}", x_val.image_shape, cls=ConfigError)
        self.image_shape_ = image_shape_of(x)
        self.strategy_ = choose_strategy(distribute)
        self.precision_ = choose_precision(self.precision)
        strategy = make_strategy(self.strategy_)
        set_seed(self.seed)
        with strategy.scope():
            with dtype_policy(self.precision_):
                model = self._build(self.image_shape_)
            check_score_settings(model, self.score, self.aggregation, self.mc_samples)
            self.history_ = train(model, x, x_val, epochs=self.epochs,
                                  batch_size=self.batch_size, learning_rate=self.learning_rate,
                                  patience=self.patience, backup_dir=backup_dir,
                                  verbose=verbose, callbacks=list(callbacks))
        self.model_ = float32_twin(model)
        self.knn_ = self.standardizer_ = None
        self._scorer = None
        in_memory = np.ones(len(x), bool)
        if self.score in KNN_SCORES:
            self.knn_, in_memory = self._fit_knn(x)
        # One scorer and one pass over the hold-out: its raw parts fit the standardizer and,
        # combined by it, are the reference scores (a second scorer would trace its graphs
        # again; the MNIST fit spent about 1 s on that and on scoring the hold-out twice).
        scorer = self._scorer_uncached()
        val_parts = blockwise(scorer.parts, x_val)
        if len(scorer.part_names) > 1:
            from anomaly.scoring import Standardizer

            self.standardizer_ = scorer.standardizer = Standardizer.fit(val_parts)
        self._scorer = scorer
        self._calibrate_scores(scorer.combine(val_parts), calibration_anomalies)
        self.decision_scores_ = self._training_scores(x, in_memory)
        self.labels_ = self.calibration_.decide(self.decision_scores_).astype(np.int64)
        return self

    def _fit_knn(self, x):
        """Keep (at most ``knn_memory``, a seeded sample) normal training codes of images
        ``(n, H, W[, C])`` (an array or :class:`~anomaly.data.stream.DiskImages`).

        Returns:
            The memory and a ``(n,)`` bool mask of the training images it holds.
        """
        from anomaly.scoring import LatentKNN

        member = np.ones(len(x), bool)
        if len(x) > self.knn_memory:
            keep = np.sort(np.random.default_rng(self.seed).permutation(len(x))[: self.knn_memory])
            member[:] = False
            member[keep] = True
        return LatentKNN(self.encode(x[member]).astype(np.float32), k=self.knn_k), member

    def _training_scores(self, x, in_memory: np.ndarray) -> np.ndarray:
        """Scores ``(n,)`` of the training images ``(n, H, W[, C])``; the kNN part of those in
        the memory leaves their own code out (else it would be 0), as PyOD does for
        ``decision_scores_``."""
        scorer = self.scorer
        parts = np.empty((len(x), len(scorer.part_names)))
        if in_memory.any():
            parts[in_memory] = blockwise(lambda b: scorer.parts(b, leave_one_out=True),
                                         x[in_memory])
        if (~in_memory).any():
            parts[~in_memory] = blockwise(scorer.parts, x[~in_memory])
        return scorer.combine(parts)

    def calibrate(self, x_normal, x_anomalies=None) -> Detector:
        """(Re)calibrate thresholds on normal images ``(n, H, W[, C])`` and optional anomalies
        (arrays, or :class:`~anomaly.data.stream.DiskImages` scored block by block)."""
        return self._calibrate_scores(self.decision_function(x_normal), x_anomalies)

    def _calibrate_scores(self, normal_scores: np.ndarray, x_anomalies=None) -> Detector:
        """:meth:`calibrate` from the normal images' scores ``(n,)``."""
        anomaly_scores = (self.decision_function(x_anomalies) if x_anomalies is not None
                          else None)
        default = self.default_operating_point or fpr_name(self.target_fprs[0])
        self.calibration_: Calibration = calibrate(normal_scores, anomaly_scores,
                                                   target_fprs=tuple(self.target_fprs),
                                                   default=default, rule=self.calibration_rule,
                                                   force=self.force_calibration)
        self.threshold_ = self.calibration_.get().threshold
        return self

    # -- scoring ------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise expected("a fitted Detector (call fit() or Detector.load())", "unfitted",
                           cls=ConfigError)

    def _scorer_uncached(self):
        from anomaly.scoring import Scorer

        return Scorer(self.model_, self.score, self.aggregation, self.mc_samples,
                      knn=self.knn_, standardizer=self.standardizer_)

    @property
    def scorer(self):
        """The compiled :class:`~anomaly.scoring.Scorer` of the fitted model."""
        self._check_fitted()
        if getattr(self, "_scorer", None) is None:
            self._scorer = self._scorer_uncached()
        return self._scorer

    def _images(self, X) -> np.ndarray:
        return to_unit_float(X, shape=self.image_shape_)

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores ``(N,)`` float64 for images ``(N, H, W[, C])`` (or
        :class:`~anomaly.data.stream.DiskImages`, scored block by block); higher = more
        anomalous."""
        self._check_fitted()
        return blockwise(lambda x: self.scorer(self._images(x)).scores, X)

    def score_samples(self, X) -> np.ndarray:
        """scikit-learn's sign: ``(N,)``, higher = more normal (``-decision_function``)."""
        return -self.decision_function(X)

    def predict(self, X, operating_point: str | None = None) -> np.ndarray:
        """``(N,)`` int: 1 = anomalous at the operating point (default: the default one)."""
        self._check_fitted()
        return self.calibration_.decide(self.decision_function(X),
                                        operating_point).astype(np.int64)

    def detect(self, images, *, operating_point: str | None = None,
               reconstruction: bool = False, error_map: bool = False,
               validated: bool = False) -> DetectorOutput:
        """Scores, normalized scores and decisions (plus optional reconstructions) for images.

        Args:
            images: ``(N, H, W[, C])`` or anything :func:`to_unit_float` accepts.
            operating_point: a name from ``calibration_.operating_points``; default if ``None``.
            validated: the images are already float32 of the model's shape, in [0, 1].
        """
        self._check_fitted()
        op = self.calibration_.get(operating_point)
        x = images if validated else self._images(images)
        out = self.scorer(x, reconstruction=reconstruction, error_map=error_map)
        recon = without_channels(out.reconstruction) if reconstruction else None
        err = without_channels(out.error_map) if error_map else None
        return DetectorOutput(out.scores, self.calibration_.normalize(out.scores),
                              self.calibration_.decide(out.scores, op.name), op.name,
                              op.threshold, recon, err, out.parts,
                              self.calibration_.surprise(out.scores))

    def normalized_score(self, scores: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` -> ``(N,)`` in [0, 1]; see :meth:`Calibration.normalize`."""
        self._check_fitted()
        return self.calibration_.normalize(scores)

    def reconstruct(self, images, *, normalize: bool = False, scale: int = 1) -> np.ndarray:
        """Reconstructions ``(N, scale*H, scale*W[, C])`` in [0, 1] (decoded at the posterior
        mean).

        ``normalize=True`` (``affine-vae``): decode with the identity transform.
        ``scale`` > 1 (``affine-vae``): decode on a finer pixel grid (super-resolution by the
        resolution-free coordinate decoder).
        """
        self._check_fitted()
        from keras import ops

        if not isinstance(scale, int) or not 1 <= scale <= MAX_DECODE_SCALE:
            raise expected(f"a decoding scale in 1..{MAX_DECODE_SCALE}", repr(scale),
                           cls=ConfigError)
        x = self._images(images)
        x4 = x[..., None] if x.ndim == 3 else x
        step = max(1, 1024 // (scale * scale))  # the decoded pixels bound the memory
        out = []
        for start in range(0, len(x4), step):
            z, _ = self.model_.encode(x4[start : start + step])
            logits = (self.model_.decode_logits(z, normalize) if scale == 1
                      else self.model_.decode_logits_at(z, scale, normalize))
            out.append(ops.convert_to_numpy(ops.sigmoid(logits)))
        return without_channels(np.concatenate(out))

    def encode(self, images) -> np.ndarray:
        """Latent codes ``(N, code_dim)`` (posterior means for VAEs) of images
        ``(N, H, W[, C])`` (or :class:`~anomaly.data.stream.DiskImages`, read block by
        block)."""
        self._check_fitted()
        from keras import ops

        shape = getattr(self, "image_shape_", None)

        def codes(images):
            x = to_unit_float(images, shape=shape)
            x4 = x[..., None] if x.ndim == 3 else x
            return np.concatenate([ops.convert_to_numpy(self.model_.encode(x4[i : i + 1024])[0])
                                   for i in range(0, len(x4), 1024)])

        return blockwise(codes, images)

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path, *, metadata: dict | None = None,
             extra_files: dict | None = None, overwrite: bool = False) -> Path:
        """Write a verified artifact directory at ``path`` (atomically).

        The detector's own files are ``model.keras``, ``detector.json`` (format, hyper-
        parameters, image shape, fitted score state), ``calibration.json``,
        ``latent_memory.npy`` (``mse+knn``) and ``history.csv``; ``extra_files`` adds others
        (name -> bytes or text), ``metadata`` goes into ``metadata.json``. See
        :mod:`anomaly.artifact` for the format.
        """
        import io

        import pandas as pd

        from anomaly.artifact import library_versions, write_artifact

        self._check_fitted()
        files: dict = {
            "model.keras": lambda p: self.model_.save(p),
            "detector.json": _json({
                "format_version": DETECTOR_FORMAT,
                "hyperparameters": self.config().to_dict(),
                "image_shape": list(self.image_shape_),
                "code_dim": int(self.model_.code_dim),
                "knn": None if self.knn_ is None else {"k": self.knn_.k},
                "standardizer": (None if self.standardizer_ is None
                                 else self.standardizer_.to_dict()),
            }),
            "calibration.json": _json(self.calibration_.to_dict()),
        }
        if self.knn_ is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(self.knn_.memory, np.float32), allow_pickle=False)
            files["latent_memory.npy"] = buf.getvalue()
        history = getattr(self, "history_", None)
        if history:
            n = max(len(v) for v in history.values())
            files["history.csv"] = pd.DataFrame(
                {k: v + [None] * (n - len(v)) for k, v in history.items()}).to_csv(index=False)
        files.update(extra_files or {})
        meta = {"model_type": self.model, "image_shape": list(self.image_shape_),
                "libraries": library_versions(), **(metadata or {})}
        return write_artifact(path, files, metadata=meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Detector:
        """Load an artifact directory written by :meth:`save` (manifest checked first).

        ``path`` may also be a model folder ``MODELS/NAME`` (its newest version, with a note).
        """
        import json

        from anomaly.models.autoencoder import Autoencoder  # first: TensorFlow, quietly

        # isort: split
        import keras

        from anomaly.artifact import read_artifact
        from anomaly.scoring import LatentKNN, Standardizer

        art = read_artifact(path, verify_files=verify)
        try:
            spec = json.loads(art.read_text("detector.json"))
            if spec.get("format_version") != DETECTOR_FORMAT:
                raise expected(f"detector format version {DETECTOR_FORMAT}",
                               f"{spec.get('format_version')!r} in {art.path}",
                               hint="Train it again with this version of anomaly.",
                               cls=ArtifactError)
            hyper = spec["hyperparameters"]
            if hyper.get("score") == "mse+knn+tp" and "tp_filters" not in hyper:
                raise expected("an mse+knn+tp artifact with the strided transformation "
                               "classifier (written with tp_filters)",
                               f"one with the earlier pooled classifier in {art.path}",
                               hint="Train it again with this version of anomaly.",
                               cls=ArtifactError)
            # An artifact from before stroke_jitter (holdout_run) was trained without it (with
            # a hold-out of single images).
            det = cls(**{"stroke_jitter": 0.0, "holdout_run": 1, **hyper})
            det.image_shape_ = tuple(int(v) for v in spec["image_shape"])
            det.calibration_ = Calibration.from_dict(json.loads(art.read_text(
                "calibration.json")))
            model = keras.models.load_model(art.file("model.keras"), safe_mode=True,
                                            compile=False)
            det.knn_ = None
            if spec.get("knn"):
                memory = np.load(art.file("latent_memory.npy"), allow_pickle=False)
                det.knn_ = LatentKNN(memory, k=int(spec["knn"]["k"]))
            det.standardizer_ = (Standardizer.from_dict(spec["standardizer"])
                                 if spec.get("standardizer") else None)
        except (KeyError, TypeError, ValueError, OSError, RecursionError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise expected("a loadable artifact",
                           f"{exc.__class__.__name__}: {str(exc)[:200]} in {art.path}",
                           cls=ArtifactError) from None
        if not isinstance(model, Autoencoder):
            raise expected("an anomaly Autoencoder model", type(model).__name__,
                           cls=ArtifactError)
        det.model_ = model
        det.threshold_ = det.calibration_.get().threshold
        det._scorer = None
        det.metadata_ = art.metadata
        # Artifacts from before the setting trained in float32.
        det.precision_ = str(art.metadata.get("precision", "float32"))
        det.metrics_ = art.json("metrics.json") if art.has("metrics.json") else None
        det.artifact_sha256_ = art.sha256
        det.path_ = art.path
        return det


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _args_doc() -> str:
    from anomaly.config import help_text

    lines = ["", "    Args:"]
    for name in DETECTOR_FIELDS:
        text = help_text(name).replace("%%", "%")
        lines.append(f"        {name}: {text}")
    return "\n".join(lines) + "\n"


Detector.__doc__ += _args_doc()

# scikit-learn's get_params reads __init__'s signature: give it every hyper-parameter, generated
# from DetectorConfig, so that the defaults live in one place.
Detector.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD if name == "model"
                         else inspect.Parameter.KEYWORD_ONLY, default=default_of(name))
       for name in DETECTOR_FIELDS])
