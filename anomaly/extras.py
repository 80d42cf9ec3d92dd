"""Which extra installs what, and the one error a command gives when its extra is missing.

The base install scores ONNX exports; the extras of pyproject.toml add the rest: ``serve`` the
service, ``train`` TensorFlow and everything that runs the Keras model, ``full`` both, ``ray``
the Ray engine. A command that needs a module of an extra that is not installed ends in one
line (``anomaly.cli.main`` turns the ``ModuleNotFoundError`` into it, wherever it is raised)::

    error: Expected TensorFlow installed for 'anomaly fit'. Received: not installed. Install it with: pip install "anomaly[full]"
"""

from __future__ import annotations

import importlib.util

from anomaly.errors import NotInstalledError, expected

#: Top-level module -> (its name in the message, its distribution, the extra to install).
#: tests/test_extras.py checks that the extra (its self-references followed) lists the
#: distribution. TensorFlow's modules name ``full``, which a light install needs to train. The
#: first module of each extra is the one an error names when the whole extra is missing.
PROVIDED_BY: dict[str, tuple[str, str, str]] = {
    "tensorflow": ("TensorFlow", "tensorflow", "full"),
    "keras": ("Keras", "keras", "full"),
    "tf2onnx": ("tf2onnx", "tf2onnx", "full"),
    "onnx": ("onnx", "onnx", "full"),
    "matplotlib": ("matplotlib", "matplotlib", "full"),
    "jinja2": ("Jinja2", "jinja2", "full"),
    "fastapi": ("FastAPI", "fastapi", "serve"),
    "uvicorn": ("uvicorn", "uvicorn", "serve"),
    "pydantic": ("pydantic", "pydantic", "serve"),
    "pydantic_settings": ("pydantic-settings", "pydantic-settings", "serve"),
    "multipart": ("python-multipart", "python-multipart", "serve"),
    "python_multipart": ("python-multipart", "python-multipart", "serve"),
    "prometheus_client": ("prometheus-client", "prometheus-client", "serve"),
    "orjson": ("orjson", "orjson", "serve"),
    "simdjson": ("pysimdjson", "pysimdjson", "serve"),
    "ray": ("Ray", "ray", "ray"),
}


def install_hint(extra: str) -> str:
    """How to install ``extra``: ``Install it with: pip install "anomaly[EXTRA]"``."""
    return f'Install it with: pip install "anomaly[{extra}]"'


def not_installed(module: str, command: str) -> NotInstalledError:
    """The error for ``command`` needing the top-level ``module`` of :data:`PROVIDED_BY` (the
    module docstring shows one)."""
    label, _, extra = PROVIDED_BY[module]
    return expected(f"{label} installed for '{command}'", "not installed",
                    hint=install_hint(extra), cls=NotInstalledError)


def missing_extra(exc: ImportError, command: str) -> NotInstalledError | None:
    """:func:`not_installed` for ``exc`` when it failed to import a module of an extra that is
    not installed; ``None`` for anything else (a module of the project, or one that is
    installed but broken: the caller re-raises those)."""
    root = (getattr(exc, "name", None) or "").partition(".")[0]
    if root not in PROVIDED_BY or _installed(root):
        return None
    # An install without the extra lacks all of its modules: name the one users know (the
    # extra's first in PROVIDED_BY: TensorFlow, FastAPI), not whichever was imported first.
    lead = next(m for m, (_, _, extra) in PROVIDED_BY.items() if extra == PROVIDED_BY[root][2])
    return not_installed(lead if not _installed(lead) else root, command)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # sys.modules[module] = None, as tests hide a package
        return False
