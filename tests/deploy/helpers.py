"""Small parsers for the deploy tests: PromQL operands and metric names, the Dockerfile,
.dockerignore, the shipped rule files and the dashboard's queries; and the validators
(kubernetes-validate, check-jsonschema) as commands."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomaly.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def require_tool(module: str, package: str) -> list[str]:
    """``python -m module``; skip without it, except in CI, which installs the dev extra: fail."""
    if importlib.util.find_spec(module):
        return [sys.executable, "-m", module]
    hint = f"{package} not installed (a dev extra: pip install -e '.[dev]')"
    if os.environ.get("CI"):
        pytest.fail(f"{hint}, although .ci/run installs it")
    pytest.skip(hint)


# -- PromQL -----------------------------------------------------------------------------------
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2"}
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPS = ("and", "or", "unless")
_MODIFIER = re.compile(r"^\s*(?:bool\b|(?:on|ignoring|group_left|group_right)\s*\([^)]*\)|"
                       r"(?:group_left|group_right)\b)\s*")
_NUMBER = re.compile(r"^\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$")


def _blank_strings(expr: str) -> str:
    """``expr`` with the contents of every string literal replaced by spaces (same length)."""
    out, quote, i = [], None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                out.append("  ")
                i += 2
                continue
            out.append(c if c == quote else " ")
            if c == quote:
                quote = None
        else:
            if c in "\"'`":
                quote = c
            out.append(c)
        i += 1
    return "".join(out)


def operands(expr: str) -> list[str]:
    """Split ``expr`` at its top-level comparison and set operators (and/or/unless).

    ``a > 0.05 and b > 0.1`` -> ``["a", "0.05", "b", "0.1"]``; modifiers (``on (...)``,
    ``bool``) are dropped. An alert's expression is true only when every operand that is not a
    number returns data, so these are what the live test queries.
    """
    blank = _blank_strings(expr)
    cuts: list[tuple[int, int]] = []
    depth, i = 0, 0
    while i < len(blank):
        c = blank[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if blank.startswith(o, i)), None)
            if op and not blank.startswith("=~", i) and not blank.startswith("!~", i):
                cuts.append((i, i + len(op)))
                i += len(op)
                continue
            m = re.match(r"(and|or|unless)\b", blank[i:])
            if m and (i == 0 or not (blank[i - 1].isalnum() or blank[i - 1] in "_:")):
                cuts.append((i, i + len(m.group(1))))
                i += len(m.group(1))
                continue
        i += 1
    parts, start = [], 0
    for a, b in cuts:
        parts.append(expr[start:a])
        start = b
    parts.append(expr[start:])
    cleaned = []
    for p in parts:
        while True:
            m = _MODIFIER.match(p)
            if not m or not m.group(0).strip():
                break
            p = p[m.end():]
        cleaned.append(p.strip())
    return cleaned


def is_number(expr: str) -> bool:
    return bool(_NUMBER.match(expr))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords, labels or durations)."""
    s = _blank_strings(expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\w)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def rule_groups() -> list[dict]:
    """The groups of the shipped recording and alert rule files, in prometheus.yml's order."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    groups = []
    for name in config["rule_files"]:
        groups += yaml.safe_load((PROM_DIR / name).read_text())["groups"]
    return groups


def rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"]]


# -- Grafana ----------------------------------------------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title + refId, expr) of every panel target."""
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in all_panels(dash)
            for t in p.get("targets", []) if t.get("expr")]


def variable_queries(dash: dict) -> dict[str, str]:
    """name -> label_values(...) query of every query variable."""
    out = {}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out[v["name"]] = q["query"] if isinstance(q, dict) else q
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}) with concrete values; none may remain."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


# -- Dockerfile -------------------------------------------------------------------------------
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instr, _, args = current.partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


def stages(instructions) -> list[list[tuple[str, str]]]:
    """The instructions split per build stage (at each FROM)."""
    out: list[list] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def arg_defaults(stage) -> dict[str, str]:
    """ARG NAME=DEFAULT of a stage (what ``docker build`` uses without ``--build-arg``)."""
    out = {}
    for instr, args in stage:
        if instr == "ARG":
            name, _, default = args.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def expand_args(text: str, args: dict[str, str]) -> str:
    """``text`` with each ``${NAME}`` / ``$NAME`` of ``args`` replaced by its value."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def env_of(stage) -> dict[str, str]:
    """ENV of a stage (KEY=VALUE pairs; $VAR references left as they are)."""
    env = {}
    for instr, args in stage:
        if instr == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(stage, instr: str) -> list[str] | None:
    """The JSON (exec form) argument list of the stage's last ``instr``, else None."""
    found = [a for i, a in stage if i == instr]
    if not found:
        return None
    args = found[-1]
    if instr == "HEALTHCHECK":
        args = args[args.index("CMD") + 3:].strip()
    return json.loads(args) if args.startswith("[") else None


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, '/'-separated) in the build context.

    The last matching pattern wins; ``!`` re-includes; a pattern matching a parent folder
    matches what is under it.
    """
    keep = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            keep = negate
    return keep


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
