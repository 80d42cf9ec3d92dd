"""Schemathesis against the live server's own OpenAPI document, with and without API keys.

Every documented route is fuzzed from the document alone (coverage, fuzzing and stateful
phases; positive and negative cases; requests without the key and with wrong ones): no 5xx,
no response that violates its documented schema, status code, content type or headers, every
schema-violating request refused, and no schema-valid request rejected -- except for what JSON
Schema cannot say, which ``fuzz_hooks.schema_valid_not_rejected`` allows by error code (bytes
that are not an image, a V2 ``data`` list whose length does not match its ``shape``). It runs
Schemathesis' own runner (``schemathesis run``) against a real server process, so uvicorn's
HTTP handling is fuzzed too, with a fixed seed and ``MAX_EXAMPLES`` per route to stay well
under a minute, and fails with Schemathesis' report (each failure with a curl line).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.service.conftest import REPO, Server, save_version

pytest.importorskip("schemathesis")

KEY = "sk-fuzz-key-0123456789"
MAX_EXAMPLES = 12
SEED = 1


@pytest.fixture(scope="module", params=["open", "keyed"])
def fuzz_target(request, detector, tmp_path_factory):
    """A real server: ``open`` (no keys, admin opened) or ``keyed`` (one key for every route)."""
    env = ({"ANOMALY_ADMIN_OPEN": "1"} if request.param == "open"
           else {"ANOMALY_API_KEYS": KEY, "ANOMALY_ADMIN_API_KEYS": KEY})
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "models"
    save_version(detector, root, "blobs", "v1")
    srv = Server(root, ANOMALY_MAX_BATCH_IMAGES="4", **env)
    srv.keyed = request.param == "keyed"
    with srv.serving():
        yield srv


def test_every_documented_route(fuzz_target, tmp_path):
    args = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; "
            "sys.exit(schemathesis())", "run", f"{fuzz_target.url}/openapi.json",
            "--checks", "all",
            # Replaced by fuzz_hooks.schema_valid_not_rejected, which knows what the document
            # cannot express.
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
            "--request-timeout", "30", "--no-color"]
    if fuzz_target.keyed:
        args += ["--header", f"Authorization: Bearer {KEY}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.fuzz_hooks",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=240)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-20000:]
    summary = report.split("SUMMARY")[-1]
    selected = re.search(r"Selected: (\d+)/(\d+)", summary)
    tested = re.search(r"Tested: (\d+)", summary)
    assert selected and tested, summary
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) >= 15, summary  # every route
    assert re.search(r"\d+ generated, \d+ passed", summary), summary
    assert "Traceback" not in fuzz_target.output(), fuzz_target.output()
