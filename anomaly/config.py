"""Configuration: every hyper-parameter and run setting, with its default and help, written once.

- :class:`DetectorConfig` holds the detector's hyper-parameters (what
  :class:`~anomaly.detector.Detector` takes as keyword arguments and ``get_params`` returns).
- :class:`RunConfig` embeds one and adds what a run of ``anomaly fit`` needs besides: the data,
  the split, the output.

YAML files (``configs/*.yaml``) and the CLI's flags are generated from these two dataclasses: a
YAML file is one flat mapping of keys of either, a flag is ``--key-name``. Flags override the
YAML file, which overrides the defaults. Keys may be written with ``-`` or ``_``; unknown keys and
values of the wrong type are errors that name the key, what was expected and what was received.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from anomaly.errors import ConfigError, expected

#: Training arithmetic (``precision``): ``auto`` chooses per machine
#: (:func:`anomaly.training.choose_precision`).
PRECISIONS = ("auto", "float32", "bfloat16")


def _opt(default, help: str, *, group: str = "", metavar: str | None = None,
         flag: str | None = None, kind: str | None = None,
         choices: tuple[str, ...] | None = None, minimum: int | None = None):
    """A config field: its default plus what the CLI and the docs need to describe it.

    ``kind`` names a CLI parser: ``ints`` (``32,64``), ``fprs`` (``1%,5%``) or ``flag`` (a
    switch without a value). ``choices``: the only values :func:`coerce` accepts.
    ``minimum``: the smallest value of an integer key, checked by :func:`coerce`, the CLI and
    ``Detector.check_params`` alike.
    """
    meta = {"help": help, "group": group, "metavar": metavar, "flag": flag, "kind": kind,
            "choices": choices, "minimum": minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


#: ``stream: auto`` streams the training images from disk when, decoded to float32, they would
#: take more than this fraction of the memory available to the process (the smaller of the
#: machine's and its cgroup's). A quarter because reading them into memory holds about two
#: copies at its peak (the decoded set and the split, then the split and TensorFlow's tensor),
#: and the model, its activations and the scoring batches need the rest.
STREAM_MEMORY_FRACTION = 0.25


@dataclass
class DetectorConfig:
    """The detector's hyper-parameters: the defaults are the recommended detector (README
    "Benchmarks"); ``Detector()`` and a default ``anomaly fit`` use exactly these."""

    model: str = _opt("conv-vae", "architecture: dense-ae, conv-ae, vae, conv-vae or affine-vae",
                      group="model")
    latent_dim: int | None = _opt(None, "code size (affine-vae: content units); unset = the "
                                  "model's default", group="model", minimum=1)
    hidden: list[int] | None = _opt(None, "dense widths or conv filters, e.g. 32,64; unset = the "
                                    "model's default", group="model", kind="ints")
    beta: float = _opt(1.0, "KL weight of the VAEs", group="model")
    recon_loss: str = _opt("bce", "training reconstruction loss: bce or mse", group="model")
    denoise: float = _opt(0.0, "train as a denoising autoencoder with this input noise std "
                          "(0 = off)", group="model", metavar="STD")
    # 0.25, not 0: MNIST 8 0.9599 against 0.9555, MNIST 2 0.9884 against 0.9869 (seeds 0-2,
    # side by side; README "Benchmarks"). configs/fashion-mnist.yaml turns it off.
    stroke_jitter: float = _opt(0.25, "training augmentation: make each training image's "
                                "strokes and edges thicker or thinner, blending it toward its "
                                "3x3 dilation or erosion by a random amount up to this (0 = "
                                "off)", group="model", metavar="AMOUNT")
    transforms: str = _opt("none", "attribute restoration (ARNet): train to restore each image "
                           "from transformed copies and score the restoration error over "
                           "all of them: none, rot4 (90-degree rotations, square images) or "
                           "flip4 (flips)", group="model")
    score: str = _opt("mse+knn+tp", "anomaly score: mse, bce, elbo (VAEs), mse+knn "
                      "(reconstruction error plus latent kNN distance) or mse+knn+tp (plus "
                      "transformation prediction: a small classifier's surprise at each "
                      "rotation of the image)", group="score")
    aggregation: str = _opt("top10", "per-pixel error aggregation: mean, sum, max or top10 (mean "
                            "of the worst 10%% of pixels)", group="score")
    mc_samples: int = _opt(0, "Monte Carlo samples of the elbo score (0 = at the posterior "
                           "mean)", group="score", minimum=0)
    tp_transforms: str = _opt("auto", "transforms the mse+knn+tp score's classifier learns to "
                              "recognize on normal images (GEOM-style): auto (rot4 for square "
                              "images, flip4 otherwise), rot4, flip4 or d4 (rotations of the "
                              "mirror image too)", group="score")
    tp_filters: list[int] = _opt([16, 32, 64], "filters of the mse+knn+tp classifier's "
                                 "convolutions, one a stage (doubling beyond them)",
                                 group="score", kind="ints")
    knn_k: int = _opt(5, "neighbours averaged by the mse+knn score", group="score", minimum=1)
    knn_memory: int = _opt(10000, "normal training codes kept for mse+knn", group="score",
                           metavar="N", minimum=1)
    target_fprs: list[float] = _opt([0.01, 0.05], "false-positive rates of the fpr@P%% "
                                    "operating points, e.g. 1%%,5%%", group="calibration",
                                    flag="target-fpr", kind="fprs")
    default_operating_point: str | None = _opt(None, "e.g. fpr@1%% or f1-max; unset = the first "
                                               "fpr@ point", group="calibration")
    calibration_rule: str = _opt("smooth", "threshold rule of the fpr@ points: smooth "
                                 "(interpolated, tail model beyond), conformal or pac",
                                 group="calibration")
    force_calibration: bool = _opt(False, "calibrate fpr@ targets that the normal reference "
                                   "images cannot resolve (a threshold resting on fewer than 5 "
                                   "expected false positives) instead of failing",
                                   group="calibration", kind="flag")
    # 0.2, not 0.1: twice the reference images for the fpr@ thresholds (MNIST's ~1,190 per
    # digit) at the same AUROC (bench/calibration_bench.py --val-fraction, README "Benchmarks").
    val_fraction: float = _opt(0.2, "fraction of the normal training images held out for early "
                               "stopping and calibration", group="calibration")
    # 100, not 1: MNIST's training file keeps each writer's digits within a few hundred
    # places, so a hold-out of single images shares its writers with the training images and
    # promised too little: fpr@1% flagged 1.22% of the test normals (the 7 2.37%); runs of 100
    # 1.15% (classes 0.82x-1.61x) at the same AUROC (seeds 0-2; README "Benchmarks").
    # configs/fashion-mnist.yaml keeps 1: that file is in random order.
    holdout_run: int = _opt(100, "hold out runs of N consecutive normal training images (fewer "
                            "when the hold-out would have under 10 runs; 1 = single images): "
                            "neighbouring files often share a writer, camera or batch, and a "
                            "hold-out that shares them with the training images promises "
                            "false-positive rates that new data does not keep",
                            group="calibration", metavar="N", minimum=1)
    # 20, not 25: `anomaly fit --normal-class 0` within a minute on a 2-core CPU even in its
    # slow hours (25 epochs took 63-65 s in one), for 0.0014 of MNIST's mean AUROC and none of
    # Fashion-MNIST's (seeds 0-2); 30 is the accurate preset (README "Benchmarks").
    epochs: int = _opt(20, "maximum training epochs", group="training", minimum=1)
    batch_size: int = _opt(128, "training batch size", group="training", minimum=1)
    learning_rate: float = _opt(1e-3, "Adam learning rate", group="training")
    patience: int = _opt(5, "early-stopping patience in epochs", group="training", minimum=0)
    precision: str = _opt(PRECISIONS[0], "training arithmetic: auto (bfloat16 on a CPU-only machine "
                          "whose CPU multiplies bfloat16 natively, Intel AMX; float32 "
                          "otherwise), float32 or bfloat16 (mixed: float32 weights and "
                          "losses); scoring and the artifact are float32 either way",
                          group="training", choices=PRECISIONS)
    seed: int = _opt(0, "seed of the split, the initialisation and the training order",
                     group="training", minimum=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """Everything ``anomaly fit`` needs: a :class:`DetectorConfig` plus data and run keys."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    dataset: str = _opt("mnist", "mnist, fashion-mnist, or a path to your images (file or "
                        "folder)", group="data")
    normal_classes: list = _opt([0], "normal class(es): 0, 0,6, 0-2 or class names",
                                group="data", flag="normal-class")
    test_data: str | None = _opt(None, "labelled test images for a user data set", group="data")
    calibration_anomalies: int = _opt(0, "labelled training anomalies that add the f1-max and "
                                      "youden operating points", group="data", metavar="N",
                                      minimum=0)
    train_limit: int | None = _opt(None, "use at most N normal training images", group="data",
                                   metavar="N", minimum=1)
    test_limit: int | None = _opt(None, "evaluate on at most N test images", group="data",
                                  metavar="N", minimum=1)
    image_size: str | None = _opt(None, "train at this size, HxW (e.g. 128x128): images of "
                                  "other sizes are resized (Lanczos), masks too; unset = the "
                                  "images' own size, which must then be one size", group="data",
                                  metavar="HxW")
    grayscale: bool = _opt(False, "convert colour images to grey (ITU-R 601 luma) before "
                           "training", group="data", kind="flag")
    stream: str = _opt("auto", "read the training images from disk batch by batch (tf.data) "
                       f"instead of into memory: auto (when, decoded to float32, they would "
                       f"take more than {STREAM_MEMORY_FRACTION:.0%}% of the memory available), "
                       "always or never",
                       group="data", metavar="MODE", choices=("auto", "always", "never"))
    cache_dir: str | None = _opt(None, "data set cache (default: $ANOMALY_CACHE_DIR or the user "
                                 "cache dir)", group="data")
    output: str = _opt("models", "models directory", group="output")
    name: str | None = _opt(None, "artifact name (default DATASET-CLASSES-MODEL)",
                            group="output")
    preset: str | None = _opt(None, "fast (the defaults: 20 epochs) or accurate (30 epochs, "
                              "about 1.4x the fit time; README \"Benchmarks\"); its values "
                              "replace the defaults and the config file's, flags override "
                              "them",
                              group="model")
    distribute: str = _opt("auto", "tf.distribute strategy: auto (multi-worker from TF_CONFIG, "
                           "mirrored on several GPUs, else none), none, mirrored, multi-worker",
                           group="training")

    def to_dict(self) -> dict:
        """One flat mapping, as in the YAML files."""
        out = self.detector.to_dict()
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "detector"})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


DETECTOR_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(DetectorConfig)}
RUN_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(RunConfig)
                                            if f.name != "detector"}
FIELDS: dict[str, dataclasses.Field] = {**DETECTOR_FIELDS, **RUN_FIELDS}
#: Batch scoring into an output folder (``anomaly score ... --output FOLDER``,
#: :mod:`anomaly.engines`): the engines, images per block of ``.npy`` and folder input (Parquet
#: blocks are its row groups), and images per runtime call (memory, not the scores, depends on
#: it). Here, not in the engines, so that the CLI can show them without importing NumPy.
ENGINE_NAMES = ("local", "ray")
BLOCK_ROWS = 10_000
SCORE_BATCH_SIZE = 1024

_HINTS = {**typing.get_type_hints(DetectorConfig), **typing.get_type_hints(RunConfig)}


def default_of(name: str):
    """The default value of a config key."""
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def declared_types(name: str) -> tuple[type, ...]:
    """The Python types a key accepts (``None`` excluded): e.g. ``(int,)`` or ``(list,)``."""
    hint = _HINTS[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                 types.UnionType) else ()
    out = []
    for t in args or (hint,):
        if t is type(None):
            continue
        out.append(typing.get_origin(t) or t)
    return tuple(out)


def accepts_none(name: str) -> bool:
    hint = _HINTS[name]
    return type(None) in typing.get_args(hint)


# The element types of list-valued keys (normal_classes may also hold class names).
_LIST_ITEMS = {"hidden": (int,), "target_fprs": (int, float), "normal_classes": (int, str)}


def coerce(key: str, value):
    """Check ``value`` for config key ``key``; returns it (ints widened to floats where a float
    is declared). Raises :class:`ConfigError` naming the key, the expected and the received."""
    allowed = declared_types(key)
    if value is None:
        if accepts_none(key):
            return None
        raise expected(f"a value for '{key}'", "null", cls=ConfigError)
    if key == "normal_classes" and isinstance(value, int | str) and not isinstance(value, bool):
        return value  # parsed against the data set's classes later
    if key == "target_fprs" and isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = not (isinstance(value, bool) and bool not in allowed) and isinstance(value, allowed)
    if not ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise expected(f"'{key}' as {names}", f"{_preview(value)} ({type(value).__name__})",
                       cls=ConfigError)
    lo = FIELDS[key].metadata.get("minimum")
    if lo is not None and isinstance(value, int) and not isinstance(value, bool) and value < lo:
        raise expected(f"'{key}' as an integer >= {lo}", _preview(value), cls=ConfigError)
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise expected(f"'{key}' in {choices}", _preview(value), cls=ConfigError)
    item_type = _LIST_ITEMS.get(key)
    if item_type and isinstance(value, list):
        bad = [v for v in value if not isinstance(v, item_type) or isinstance(v, bool)]
        if bad or not value:
            names = " or ".join(t.__name__ for t in item_type)
            raise expected(f"'{key}' as a non-empty list of {names}", _preview(value),
                           cls=ConfigError)
    return value


def _preview(value, limit: int = 60) -> str:
    # reprlib bounds the depth and the length: a hostile nested value cannot recurse or flood.
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 6, 4, limit, limit
    return r.repr(value)


def normalize_key(key) -> str:
    k = str(key).strip().replace("-", "_")
    if k == "normal_class":
        k = "normal_classes"
    if k not in FIELDS:
        close = difflib.get_close_matches(k, FIELDS, n=1)
        raise expected(f"a configuration key in {sorted(FIELDS)}", _preview(key),
                       hint=f"Did you mean '{close[0]}'?" if close else None, cls=ConfigError)
    return k


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict of validated keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise expected("an existing config file", f"{path} (not found)",
                       cls=ConfigError) from None
    except IsADirectoryError:
        raise expected("a config file", f"{path} (a folder)", cls=ConfigError) from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise expected("a valid YAML config file", f"{path}: {first}",
                       cls=ConfigError) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise expected("a YAML mapping of key: value", f"a {type(data).__name__} in {path}",
                       cls=ConfigError)
    out = {}
    for k, v in data.items():
        key = normalize_key(k)
        out[key] = coerce(key, v)
    return out


def make_run_config(values: dict) -> RunConfig:
    """A :class:`RunConfig` from a flat mapping of (already coerced) keys."""
    det = {k: v for k, v in values.items() if k in DETECTOR_FIELDS}
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    return RunConfig(detector=DetectorConfig(**det), **run)


#: Named detector configurations (``--preset``): the values each sets. ``fast`` is the defaults.
PRESETS: dict[str, dict] = {
    "fast": {},
    # Ten epochs more than the default: with MNIST's stroke jitter +0.0021 on its mean (0.9870)
    # and +0.0063 on its 8 (0.9623), +0.0002 on Fashion-MNIST's (seeds 0-2, README
    # "Benchmarks"); 50 epochs measured 0.9640 on MNIST 8, inside that spread, for 1.5x the
    # fit. The wider classifier (tp_filters 32,64,128) that was the accurate preset before
    # classifier design 2 measures no better than design 2's default (within 0.003 either way
    # on the four hardest classes, seed 0).
    "accurate": {"epochs": 30},
}


def preset_values(name: str | None) -> dict:
    """The keys a preset sets (``{}`` for none); an unknown name is a :class:`ConfigError`."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise expected(f"a preset in {sorted(PRESETS)}", _preview(name), cls=ConfigError)
    return dict(PRESETS[name])


def resolve(config_file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults <- YAML file <- preset <- overrides (flags; ``None`` values are ignored).

    A preset (the ``preset`` key, from the file or a flag) replaces the values of the keys it
    sets, the file's included; flags still override it.
    """
    values: dict = {}
    if config_file is not None:
        values.update(load_yaml(config_file))
    flags = {}
    for k, v in (overrides or {}).items():
        if v is not None:
            key = normalize_key(k)
            flags[key] = coerce(key, v)
    preset = flags.get("preset", values.get("preset"))
    values.update(preset_values(preset))
    values.update(flags)
    return make_run_config(values)


def help_text(name: str) -> str:
    """The field's help with its default, for ``--help`` (``%`` escaped for argparse)."""
    f = FIELDS[name]
    default = default_of(name)
    if isinstance(default, list):
        shown = ",".join(_fmt_default(v, f.metadata.get("kind")) for v in default)
    else:
        shown = "unset" if default is None else _fmt_default(default, f.metadata.get("kind"))
    return f"{f.metadata['help']} (default: {shown.replace('%', '%%')})"


def _fmt_default(v, kind) -> str:
    if kind == "fprs":
        return f"{100 * v:g}%"
    return str(v)

