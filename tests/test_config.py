"""Run configuration: YAML files, flag overrides, unknown keys and wrong types."""

from __future__ import annotations

import pytest

from anomaly.cli import _resolve_config, build_parser
from anomaly.config import (
    DETECTOR_FIELDS,
    FIELDS,
    DetectorConfig,
    RunConfig,
    declared_types,
    load_yaml,
    resolve,
)
from anomaly.detector import Detector
from anomaly.errors import ConfigError


def _write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_flags():
    cfg = resolve()
    assert cfg == RunConfig()
    assert cfg.detector.model == "conv-vae" and cfg.normal_classes == [0]
    assert cfg.detector.score == "mse+knn+tp" and cfg.detector.aggregation == "top10"
    assert cfg.detector.target_fprs == [0.01, 0.05]


def test_yaml_values_are_loaded_with_dashes_or_underscores(tmp_path):
    path = _write(tmp_path, "model: vae\nlatent-dim: 8\nhidden: [16, 8]\nbatch_size: 64\n"
                            "learning-rate: 0.002\nnormal_classes: '0,6'\ntarget_fprs: 0.05\n")
    cfg = resolve(path)
    assert cfg.detector.model == "vae"
    assert cfg.detector.latent_dim == 8
    assert cfg.detector.hidden == [16, 8]
    assert cfg.detector.batch_size == 64
    assert cfg.detector.learning_rate == 0.002
    assert cfg.normal_classes == "0,6"  # parsed against the data set's classes later
    assert cfg.detector.target_fprs == [0.05]  # a single FPR becomes a list
    assert cfg.detector.epochs == RunConfig().detector.epochs  # untouched keys keep their defaults


def test_int_for_float_key_is_accepted_as_float(tmp_path):
    cfg = resolve(_write(tmp_path, "beta: 2\n"))
    assert cfg.detector.beta == 2.0 and isinstance(cfg.detector.beta, float)


def test_flags_override_yaml_and_none_flags_are_ignored(tmp_path):
    path = _write(tmp_path, "epochs: 3\nmodel: vae\nseed: 7\n")
    cfg = resolve(path, {"epochs": 5, "model": None, "batch-size": 16})
    assert cfg.detector.epochs == 5  # the flag wins
    assert cfg.detector.model == "vae"  # a flag that was not given (None) leaves the YAML value
    assert cfg.detector.seed == 7
    assert cfg.detector.batch_size == 16


def test_cli_flags_override_yaml(tmp_path):
    path = _write(tmp_path, "epochs: 3\nmodel: vae\nhidden: [64]\nnormal_classes: 1\n")
    args = build_parser().parse_args(["fit", "--config", str(path), "--epochs", "5",
                                      "--hidden", "8,16", "--normal-class", "0,6"])
    cfg = _resolve_config(args)
    assert cfg.detector.epochs == 5
    assert cfg.detector.hidden == [8, 16]
    assert cfg.normal_classes == "0,6"
    assert cfg.detector.model == "vae"


def test_a_preset_replaces_defaults_and_file_values_and_flags_override_it(tmp_path):
    from anomaly.config import PRESETS

    assert PRESETS["fast"] == {}  # fast is the defaults: Detector() == a default fit
    longer = PRESETS["accurate"]["epochs"]
    assert longer > DetectorConfig().epochs
    path = _write(tmp_path, "epochs: 3\nlatent_dim: 4\n")
    assert resolve(path).detector.epochs == 3
    cfg = resolve(path, {"preset": "accurate"})
    assert cfg.detector.epochs == longer and cfg.preset == "accurate"
    assert cfg.detector.latent_dim == 4  # a key the preset does not set keeps the file's value
    assert resolve(path, {"preset": "accurate", "epochs": 2}).detector.epochs == 2
    # From the file itself too.
    assert resolve(_write(tmp_path, "preset: accurate\n")).detector.epochs == longer
    with pytest.raises(ConfigError, match=r"Expected a preset in \['accurate', 'fast'\]. "
                                          r"Received: 'turbo'"):
        resolve(None, {"preset": "turbo"})


def test_to_yaml_round_trip(tmp_path):
    cfg = resolve(None, {"model": "dense-ae", "hidden": [32], "epochs": 2, "target_fprs": [0.01,
                                                                                           0.05]})
    back = resolve(_write(tmp_path, cfg.to_yaml()))
    assert back == cfg


def test_detector_params_are_detector_arguments():
    cfg = resolve(None, {"model": "vae", "latent_dim": 3, "epochs": 2})
    params = cfg.detector.to_dict()
    assert set(params) == set(DETECTOR_FIELDS)
    det = Detector(**params)
    assert det.model == "vae" and det.latent_dim == 3 and det.epochs == 2
    assert Detector.from_config(cfg.detector).get_params() == params


def test_detector_defaults_are_the_fit_defaults():
    """Detector() is the detector a default `anomaly fit` trains: one set of defaults."""
    import yaml

    fit_defaults = yaml.safe_load(resolve().to_yaml())
    params = Detector().get_params()
    assert {k: fit_defaults[k] for k in params} == params
    assert params == DetectorConfig().to_dict()
    assert params["score"] == "mse+knn+tp" and params["aggregation"] == "top10"


def test_fit_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, shown in (("--score", "(default: mse+knn+tp)"), ("--epochs", f"(default: {DetectorConfig().epochs})"),
                        ("--target-fpr", "(default: 1%,5%)"), ("--model", "(default: conv-vae)"),
                        ("--latent-dim", "(default: unset)"), ("--normal-class", "(default: 0)")):
        assert flag in text and shown in text, (flag, shown)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"Received: 'epoch'.*Did you mean 'epochs'\?"):
        resolve(_write(tmp_path, "epoch: 3\n"))
    with pytest.raises(ConfigError, match="Did you mean 'latent_dim'"):
        resolve(None, {"latent-dimm": 3})


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve(_write(tmp_path, "zzzzzz: 1\n"))
    assert "Did you mean" not in str(info.value)
    assert "a configuration key in" in str(info.value) and "'epochs'" in str(info.value)


@pytest.mark.parametrize(("text", "key", "received"), [
    ("epochs: ten\n", "epochs", "'ten' (str)"),
    ("epochs: 2.5\n", "epochs", "2.5 (float)"),
    ("epochs: true\n", "epochs", "True (bool)"),
    ("hidden: 32\n", "hidden", "32 (int)"),
    ("learning_rate: fast\n", "learning_rate", "'fast' (str)"),
    ("model: [conv-ae]\n", "model", "['conv-ae'] (list)"),
])
def test_wrong_types_name_key_expected_and_received(tmp_path, text, key, received):
    with pytest.raises(ConfigError) as info:
        resolve(_write(tmp_path, text))
    msg = str(info.value)
    assert f"Expected '{key}' as" in msg
    assert f"Received: {received}" in msg


@pytest.mark.parametrize(("text", "key", "lo"), [
    ("epochs: 0\n", "epochs", 1), ("patience: -1\n", "patience", 0),
    ("latent_dim: 0\n", "latent_dim", 1), ("train_limit: 0\n", "train_limit", 1),
])
def test_integers_below_their_minimum_are_refused(tmp_path, text, key, lo):
    with pytest.raises(ConfigError, match=rf"Expected '{key}' as an integer >= {lo}\. "
                       rf"Received: {text.split(': ')[1].strip()}$"):
        resolve(_write(tmp_path, text))


def test_every_integer_key_states_its_minimum():
    # The CLI, coerce and check_params all read it: a key without one would be unchecked.
    for name in FIELDS:
        if int in declared_types(name):
            assert isinstance(FIELDS[name].metadata["minimum"], int), name


def test_null_for_a_required_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"Expected a value for 'epochs'\. Received: null"):
        resolve(_write(tmp_path, "epochs: null\n"))
    assert resolve(_write(tmp_path, "latent_dim: null\n", "ok.yaml")).detector.latent_dim is None


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="an existing config file"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="a valid YAML config file"):
        load_yaml(_write(tmp_path, "epochs: [1, 2\n", "broken.yaml"))
    with pytest.raises(ConfigError, match=r"a YAML mapping of key: value\. Received: a list"):
        load_yaml(_write(tmp_path, "- epochs\n- 3\n", "list.yaml"))
    assert load_yaml(_write(tmp_path, "", "empty.yaml")) == {}
