"""The install's layout (pyproject.toml) and the error a command gives without its extra.

The base has no TensorFlow; ``serve``, ``train``, ``full`` (train + serve), ``gpu``, ``ray`` and
``dev`` add to it, naming each other (``anomaly[train]``) rather than repeating a pin. A module of
an extra that is not installed ends a command in one line naming the extra
(anomaly/extras.py); tests/service/test_light_install.py checks it on a real light install.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from anomaly import extras
from anomaly.cli import main
from anomaly.errors import NotInstalledError

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extra: str | None) -> dict[str, str]:
    """Distribution -> requirement of the base (``None``) or of ``extra`` with the base and the
    extras it names (``anomaly[train,serve]``) followed."""
    meta = PROJECT["project"]
    out, todo, seen = {}, [extra, None], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        reqs = meta["dependencies"] if current is None else meta["optional-dependencies"][current]
        for req in reqs:
            name, inner = _REQ.match(req).groups()
            if _canonical(name) == meta["name"]:
                todo += [e.strip() for e in (inner or "").split(",") if e.strip()]
            else:
                out[_canonical(name)] = req
    return out


def test_the_base_install_has_no_tensorflow_and_every_extra_its_packages():
    base = requirements(None)
    assert not {"tensorflow", "keras", "tf2onnx", "onnx", "fastapi", "ray"} & set(base)
    assert {"numpy", "onnxruntime", "scikit-learn", "scipy", "pyyaml"} <= set(base)
    for module, (_, dist, extra) in extras.PROVIDED_BY.items():
        assert _canonical(dist) in requirements(extra), (module, extra)
        assert _canonical(dist) not in base, module
    assert set(requirements("serve")) | set(requirements("train")) == set(requirements("full"))
    assert set(requirements("full")) | set(requirements("ray")) <= set(requirements("dev"))
    assert set(requirements("full")) <= set(requirements("gpu"))


def test_one_pin_per_package():
    """Each package is named in one place, but TensorFlow's CUDA variant in ``gpu`` (an extra
    cannot reuse another's pin; its comment says so), which must pin it the same."""
    meta = PROJECT["project"]
    named: dict[str, list[str]] = {}
    for reqs in [meta["dependencies"], *meta["optional-dependencies"].values()]:
        for req in reqs:
            name = _canonical(_REQ.match(req).group(1))
            if name != meta["name"]:
                named.setdefault(name, []).append(req)
    twice = {name: reqs for name, reqs in named.items() if len(reqs) > 1}
    assert set(twice) == {"tensorflow"}, twice
    pins = {re.sub(r"\[[^\]]*\]", "", r).replace(" ", "") for r in twice["tensorflow"]}
    assert len(pins) == 1, pins


def test_missing_extra_names_the_extra(monkeypatch):
    hidden = {"tensorflow", "keras", "fastapi", "pydantic"}
    monkeypatch.setattr(extras, "_installed", lambda m: m not in hidden)
    err = extras.missing_extra(ModuleNotFoundError(name="tensorflow"), "anomaly fit")
    assert isinstance(err, NotInstalledError)
    assert str(err) == ("Expected TensorFlow installed for 'anomaly fit'. Received: not "
                        'installed. Install it with: pip install "anomaly[full]"')
    # Keras fails first on some paths: the message still names TensorFlow, which is missing.
    keras = extras.missing_extra(ModuleNotFoundError(name="keras.ops"), "anomaly models")
    assert str(keras).startswith("Expected TensorFlow installed for 'anomaly models'")
    serve = extras.missing_extra(ModuleNotFoundError(name="pydantic"), "anomaly serve")
    assert str(serve) == ("Expected FastAPI installed for 'anomaly serve'. Received: not "
                          'installed. Install it with: pip install "anomaly[serve]"')
    # Only what is truly absent: an installed package (a broken submodule), or the project's
    # own module, is a bug to show as it is.
    assert extras.missing_extra(ModuleNotFoundError(name="onnx.reference"), "x") is None
    assert extras.missing_extra(ModuleNotFoundError(name="anomaly.nothing"), "x") is None
    assert extras.missing_extra(ModuleNotFoundError(name=None), "x") is None


def test_the_cli_turns_a_missing_extra_into_one_line(monkeypatch, capsys, tmp_path):
    import anomaly.cli as cli

    monkeypatch.setattr(extras, "_installed", lambda m: m != "tensorflow")

    def needs_tensorflow(args):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(cli, "cmd_evaluate", needs_tensorflow)
    assert main(["evaluate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: Expected TensorFlow installed for 'anomaly evaluate'. Received: not installed. "
        'Install it with: pip install "anomaly[full]"']

    def broken(args):
        raise ModuleNotFoundError("No module named 'anomaly.gone'", name="anomaly.gone")

    monkeypatch.setattr(cli, "cmd_data", broken)
    with pytest.raises(ModuleNotFoundError, match=r"anomaly\.gone"):
        main(["data", "fetch"])
