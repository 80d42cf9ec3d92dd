"""Convert a CustomResourceDefinition's ``openAPIV3Schema`` to a strict JSON schema for
``check-jsonschema``, the way kubeconform's openapi2jsonschema does it.

    python tests/deploy/schemas/crd2jsonschema.py CRD.yaml OUT_DIR

writes ``OUT_DIR/<kind>_<version>.json`` (lower-case kind) for every served version.

What changes from OpenAPI 3.0 to JSON schema, and why:

- ``nullable: true`` becomes a ``"null"`` type: JSON schema has no ``nullable``.
- ``x-kubernetes-int-or-string`` drops ``type``: the API server accepts both (the CRD's own
  ``anyOf`` of integer and string is kept).
- Every object with ``properties``, unless it says ``additionalProperties`` or
  ``x-kubernetes-preserve-unknown-fields``, gets ``additionalProperties: false``: that is
  ``kubectl --validate=strict``, which rejects a misspelt field instead of dropping it.
- A ``pattern`` with Go's leading ``(?i)`` (case-insensitive), which ECMAScript regexes (what
  JSON schema uses) lack, has each letter spelt as ``[xX]`` instead.
- ``apiVersion`` and ``kind`` are pinned to the group/version and kind, so a manifest is only
  valid against the schema of its own kind.
- Descriptions and the other ``x-kubernetes-*`` annotations are dropped, and sub-schemas that
  repeat (KServe repeats the whole pod spec for predictor, transformer and explainer) are
  written once under ``definitions`` and referenced: neither changes what validates, and
  KServe's InferenceService CRD is 2 MB of YAML.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

DROP = {"description", "example", "externalDocs"}
MAPS = ("properties", "patternProperties", "definitions")  # name -> sub-schema
SCHEMAS = ("items", "additionalProperties", "not")  # one sub-schema
LISTS = ("allOf", "anyOf", "oneOf")  # a list of sub-schemas


def ecma_pattern(pattern: str) -> str:
    """A Go (RE2) ``pattern`` as an ECMAScript one: ``(?i)`` spelt out letter by letter.

    Only for patterns without escapes or character classes after ``(?i)``, where spelling
    each letter as ``[xX]`` is exact; anything else is refused rather than guessed.
    """
    if "(?i)" not in pattern:
        return pattern
    head, _, tail = pattern.partition("(?i)")
    if any(c in tail for c in "\\[]") or "(?" in tail:
        raise ValueError(f"cannot translate the case-insensitive pattern {pattern!r}")
    return head + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in tail)


def convert(node):
    """One OpenAPI v3 (Kubernetes flavour) schema node as a JSON schema node."""
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in DROP or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in MAPS:
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in SCHEMAS or key in LISTS:
            out[key] = convert(value)
        elif key == "pattern":
            out[key] = ecma_pattern(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


def _key(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def share_repeats(schema: dict, min_size: int = 400) -> dict:
    """``schema`` with every sub-schema that occurs more than once (and serializes to at least
    ``min_size`` characters) moved to ``definitions`` and replaced by a ``$ref``; largest
    first, so a repeated pod spec becomes one definition, not one per container inside it."""
    counts: Counter[str] = Counter()

    def count(node):
        if isinstance(node, dict):
            counts[_key(node)] += 1
            for v in node.values():
                count(v)
        elif isinstance(node, list):
            for v in node:
                count(v)

    count(schema)
    definitions: dict[str, dict] = {}

    def children(node: dict) -> dict:
        """A schema's keys with their sub-schemas replaced; data (enum, default...) as is."""
        out = {}
        for k, v in node.items():
            if k in MAPS:
                out[k] = {name: replace(sub) for name, sub in v.items()}
            elif k in SCHEMAS:
                out[k] = replace(v)
            elif k in LISTS:
                out[k] = [replace(sub) for sub in v]
            else:
                out[k] = v
        return out

    def replace(node):
        if not isinstance(node, dict):
            return node  # additionalProperties: false
        key = _key(node)
        if counts[key] > 1 and len(key) >= min_size:
            name = hashlib.sha256(key.encode()).hexdigest()[:12]
            if name not in definitions:
                definitions[name] = children(node)
            return {"$ref": f"#/definitions/{name}"}
        return children(node)

    out = children(schema)
    if definitions:
        out["definitions"] = definitions
    return out


def crd_schemas(crd: dict) -> dict[str, dict]:
    """``{"<kind>_<version>": JSON schema}`` for each served version of ``crd``."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = convert(version["schema"]["openAPIV3Schema"])
        schema["properties"]["apiVersion"] = {"type": "string",
                                              "enum": [f"{group}/{version['name']}"]}
        schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        out[f"{kind.lower()}_{version['name']}"] = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": f"{kind} {group}/{version['name']}", **share_repeats(schema)}
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: crd2jsonschema.py CRD.yaml OUT_DIR", file=sys.stderr)
        return 2
    source, out_dir = Path(argv[0]), Path(argv[1])
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        for name, schema in crd_schemas(doc).items():
            target = out_dir / f"{name}.json"
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            tmp.replace(target)  # atomic: a schema file is never half-written
            print(f"{target} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
