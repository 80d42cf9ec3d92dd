"""Run configuration: one flat set of keys, from a YAML file and/or command-line flags.

Flags override the YAML file, which overrides the defaults below. Keys may be written with
``-`` or ``_``. Unknown keys and values of the wrong type are errors that name the key, what
was expected and what was received.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from anomaly.errors import ConfigError, expected

#: The keys of RunConfig that are Detector hyper-parameters (Detector.__init__'s arguments).
DETECTOR_KEYS = ("model", "latent_dim", "hidden", "beta", "recon_loss", "denoise", "score",
                 "aggregation", "mc_samples", "knn_k", "knn_memory", "target_fprs",
                 "default_operating_point", "epochs", "batch_size", "learning_rate", "patience",
                 "seed")


@dataclass
class RunConfig:
    """Everything ``anomaly fit`` needs. Hyper-parameters mirror :class:`~anomaly.Detector`."""

    dataset: str = "mnist"
    normal_classes: list = field(default_factory=lambda: [0])
    test_data: str | None = None
    calibration_anomalies: int = 0
    val_fraction: float = 0.1
    train_limit: int | None = None
    test_limit: int | None = None
    cache_dir: str | None = None
    output: str = "models"
    distribute: str = "auto"
    name: str | None = None
    # Detector hyper-parameters (DETECTOR_KEYS).
    # The defaults are the recommended detector (configs/mnist.yaml; README "Benchmarks").
    model: str = "conv-vae"
    latent_dim: int | None = None
    hidden: list | None = None
    beta: float = 1.0
    recon_loss: str = "bce"
    denoise: float = 0.0
    score: str | None = "mse+knn"
    aggregation: str = "top10"
    mc_samples: int = 0
    knn_k: int = 5
    knn_memory: int = 10000
    target_fprs: list = field(default_factory=lambda: [0.01, 0.05])
    default_operating_point: str | None = None
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    patience: int = 5
    seed: int = 0

    def detector_params(self) -> dict:
        return {k: getattr(self, k) for k in DETECTOR_KEYS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


_FIELDS = {f.name: f for f in fields(RunConfig)}
_DEFAULTS = asdict(RunConfig())


# The element types of list-valued keys (normal_classes may also hold class names).
_LIST_ITEMS = {"hidden": (int,), "target_fprs": (int, float), "normal_classes": (int, str)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list}


def _declared(key: str) -> list[str]:
    ann = str(_FIELDS[key].type)
    return [name for name in _TYPES if re.search(rf"\b{name}\b", ann)]


def _coerce(key: str, value):
    declared = _declared(key)
    if value is None:
        if "None" in str(_FIELDS[key].type):
            return None
        raise expected(f"a value for '{key}'", "null", cls=ConfigError)
    if key == "normal_classes" and isinstance(value, int | str):
        return value  # parsed against the data set's classes later
    if key == "target_fprs" and isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if "float" in declared and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if "int" not in declared else value
    if isinstance(value, bool) and "bool" not in declared:
        ok = False
    else:
        ok = isinstance(value, tuple(_TYPES[d] for d in declared))
    if not ok:
        raise expected(f"'{key}' as {' or '.join(declared)}",
                       f"{value!r} ({type(value).__name__})", cls=ConfigError)
    item_type = _LIST_ITEMS.get(key)
    if item_type and isinstance(value, list):
        bad = [v for v in value if not isinstance(v, item_type) or isinstance(v, bool)]
        if bad or not value:
            names = " or ".join(t.__name__ for t in item_type)
            raise expected(f"'{key}' as a non-empty list of {names}", repr(value),
                           cls=ConfigError)
    return value


def normalize_key(key: str) -> str:
    k = str(key).strip().replace("-", "_")
    if k not in _FIELDS:
        close = difflib.get_close_matches(k, _FIELDS, n=1)
        raise expected(f"a configuration key in {sorted(_FIELDS)}", repr(key),
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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise expected("a valid YAML config file", f"{path}: {str(exc).splitlines()[0]}",
                       cls=ConfigError) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise expected("a YAML mapping of key: value", f"a {type(data).__name__} in {path}",
                       cls=ConfigError)
    return {normalize_key(k): _coerce(normalize_key(k), v) for k, v in data.items()}


def resolve(config_file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides (flags; ``None`` values are ignored)."""
    values = dict(_DEFAULTS)
    if config_file is not None:
        values.update(load_yaml(config_file))
    for k, v in (overrides or {}).items():
        if v is not None:
            key = normalize_key(k)
            values[key] = _coerce(key, v)
    return RunConfig(**values)
