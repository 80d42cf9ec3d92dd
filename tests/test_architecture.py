"""The shape of the code: imports run one way, defaults are written once, no 28x28 constants."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("anomaly", "service"):
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere (top level or inside functions).

    Importing a submodule always imports its parent packages, so an import of an ancestor
    package (``from anomaly import _tf``) counts as an edge to the named submodule only, and a
    package's ``__init__`` re-exporting its own submodules is not an edge.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]
            for target in names:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target or target == mod:
                    continue
                if mod.startswith(target + "."):  # an ancestor package
                    continue
                if is_pkg and target.startswith(mod + "."):  # a package's own submodule
                    continue
                graph[mod].add(target)
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    seen: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for mod in sorted(graph):
        if mod not in seen:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_chain_runs_down():
    """artifact knows nothing of the detector or TensorFlow; data nothing of models; anomaly
    nothing of service."""
    graph = import_graph()

    def reach(mod: str) -> set[str]:
        out, todo = set(), [mod]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in out:
                    out.add(nxt)
                    todo.append(nxt)
        return out

    assert not {m for m in reach("anomaly.artifact") if m.startswith(("anomaly.detector",
                                                                       "anomaly.models",
                                                                       "anomaly.scoring",
                                                                       "anomaly._tf"))}
    for mod in graph:
        if mod.startswith("anomaly.data"):
            assert not {m for m in graph[mod] if m.startswith(("anomaly.models",
                                                               "anomaly.detector"))}, mod
        if mod.startswith("anomaly"):
            assert not {m for m in graph[mod] if m.startswith("service")}, mod
    source = (REPO / "anomaly" / "artifact.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(tensorflow|keras)\b", source, re.M)


def test_no_image_size_constants_outside_the_builtin_data_sets():
    pattern = re.compile(r"\b(28|784)\b")
    hits = []
    for mod, path in _modules().items():
        if mod == "anomaly.data.builtin":  # MNIST and Fashion-MNIST are 28x28 by definition
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_every_default_is_written_once():
    """Detector, the CLI and the YAML keys take their defaults from anomaly.config."""
    import inspect

    from anomaly.config import DETECTOR_FIELDS, default_of
    from anomaly.detector import Detector

    sig = inspect.signature(Detector.__init__)
    assert [p for p in sig.parameters if p != "self"] == list(DETECTOR_FIELDS)
    for name, param in sig.parameters.items():
        if name != "self":
            assert param.default == default_of(name), name
    cli = (REPO / "anomaly" / "cli.py").read_text()
    for flag in ("--epochs", "--latent-dim", "--knn-k"):
        assert f'"{flag}"' not in cli, f"{flag} is written by hand in cli.py"
    # `score --batch-size` is another setting (images per runtime call), whose default is
    # anomaly.config.SCORE_BATCH_SIZE; the training batch size's flag stays generated.
    assert cli.count('"--batch-size"') == 2  # the flag and its own error message
    assert "default: {SCORE_BATCH_SIZE}" in cli
