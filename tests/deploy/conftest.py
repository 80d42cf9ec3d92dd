"""Fixtures of the deploy tests: a tiny artifact, the service installed and started the way the
Dockerfile does it, a real Prometheus scraping it with the shipped configuration, and traffic.

Everything listens on 127.0.0.1 on free ports; every wait is bounded; every process started here
is stopped by its pid in the fixture's teardown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy import helpers
from tests.deploy.helpers import PROM_DIR, REPO
from tests.service.conftest import bars, blobs, free_port, save_version

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
INSTALL_HINT = ("Debian's 'prometheus' package (apt-get install prometheus; .ci/run installs "
                "it) brings the prometheus server and promtool")


def require_binary(path: str | None, name: str) -> str:
    """The binary's path; skip without it, except in CI, where .ci/run installs it: fail."""
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} not found although CI installs it: {INSTALL_HINT}")
    pytest.skip(f"{name} not installed: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary(PROMTOOL, "promtool")


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    """Call ``check`` until it returns a truthy value (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last_error!r})")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


# -- the artifact ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """``blobs/v1`` and ``blobs/v2``: one tiny dense autoencoder (1 epoch, 200 images)."""
    from anomaly.detector import Detector

    det = Detector("dense-ae", force_calibration=True, epochs=1, batch_size=32, hidden=[32], latent_dim=4,
                   target_fprs=(0.01, 0.1)).fit(blobs(200))
    root = tmp_path_factory.mktemp("deploy") / "models"
    save_version(det, root, "blobs", "v1")
    save_version(det, root, "blobs", "v2")
    return root


# -- the Dockerfile's steps, without Docker ---------------------------------------------------------
@pytest.fixture(scope="session")
def dockerfile_stages():
    build, runtime = helpers.stages(helpers.dockerfile_instructions())
    return build, runtime


def dockerfile_install_command(build_stage) -> list[str]:
    """The build stage's ``pip install ...`` command, as argv, with its ARGs at their
    defaults (``./[serve]``)."""
    runs = [shlex.split(a) for i, a in build_stage if i == "RUN" and "pip install" in a]
    assert len(runs) == 1, f"expected one 'pip install' RUN in the build stage: {runs}"
    defaults = helpers.arg_defaults(build_stage)
    argv = [helpers.expand_args(a, defaults) for a in runs[0]]
    assert argv[:2] == ["pip", "install"], argv
    return argv


def installed_project(argv: list[str]) -> tuple[str, str]:
    """``(path, extras)`` of the project an install command names last: ``./[serve]`` ->
    ``("./", "serve")``; the path must be the build context itself."""
    path, _, extras = argv[-1].partition("[")
    assert path in (".", "./"), f"the image installs the project itself ('pip install .'): {argv}"
    return path, extras.rstrip("]")


@pytest.fixture(scope="session")
def image_site(dockerfile_stages, tmp_path_factory) -> Path:
    """What the image's build stage installs, installed here the same way.

    The build context holds exactly the files the Dockerfile COPYs (each kept by
    .dockerignore); the Dockerfile's own ``pip install`` command runs on it, into a target
    folder, with ``--no-deps`` (the dependencies are those of this environment, installed from
    the same pyproject: the full install, where the image's default is the light one, which
    tests/service/test_light_install.py builds for real) and, where setuptools is here,
    without fetching anything.
    """
    build, _ = dockerfile_stages
    work = tmp_path_factory.mktemp("image")
    context = work / "src"  # the build stage's WORKDIR
    context.mkdir()
    patterns = helpers.dockerignore_patterns()

    def ignored(folder: str, names: list[str]) -> set[str]:  # .dockerignore, as docker applies it
        rel = Path(folder).relative_to(REPO)
        return {n for n in names if not helpers.dockerignore_allows((rel / n).as_posix(), patterns)}

    for instr, args in build:
        if instr != "COPY" or args.startswith("--from"):
            continue
        *sources, dest = shlex.split(args)
        into = context / dest
        for src in sources:
            assert helpers.dockerignore_allows(src, patterns), f".dockerignore drops {src}"
            if (REPO / src).is_dir():  # docker copies a folder's contents into dest
                shutil.copytree(REPO / src, into, ignore=ignored, dirs_exist_ok=True)
            else:
                target = into / Path(src).name if dest.endswith(("/", ".")) else into
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, target)
    argv = dockerfile_install_command(build)
    installed_project(argv)
    site = work / "site"
    # Offline with this environment's setuptools when it has one; else pip fetches the build
    # backend from the package index, as `docker build` would.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    cmd = [sys.executable, "-m", *argv[:-1], "--no-deps", *offline, "--quiet",
           "--target", str(site), str(context)]
    done = subprocess.run(cmd, cwd=context, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"
    return site


class ImageServer:
    """The service started the way the image starts it: its ENTRYPOINT with its ENV.

    Differences from the container, and only these: 127.0.0.1 and a free port instead of
    0.0.0.0:8000, the models directory given here instead of /models, and the installed
    package on PYTHONPATH instead of a virtual environment in /opt/venv.
    """

    def __init__(self, site: Path, runtime_stage, models: Path, workdir: Path):
        entry = helpers.exec_form(runtime_stage, "ENTRYPOINT")
        cmd = (helpers.exec_form(runtime_stage, "CMD") or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.image_env = helpers.env_of(runtime_stage)
        env = {k: v for k, v in self.image_env.items() if k != "PATH"}
        env.update(ANOMALY_MODELS_DIR=str(models), ANOMALY_HOST="127.0.0.1",
                   ANOMALY_PORT=str(self.port), HOME=str(workdir),
                   KERAS_HOME=str(workdir / ".keras"), ANOMALY_ACCESS_LOG="false")
        self.env = {**os.environ, **env, "PYTHONPATH": str(site),
                    "PATH": f"{site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.argv = [str(site / "bin" / entry[0]), *entry[1:], *cmd]
        self.log = workdir / f"server-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir, env=self.env)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 90) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout, "the service to be ready", interval=0.1)


@pytest.fixture(scope="session")
def service(image_site, dockerfile_stages, models_dir, tmp_path_factory):
    """The service, installed and started as the image does (see :class:`ImageServer`)."""
    _, runtime = dockerfile_stages
    srv = ImageServer(image_site, runtime, models_dir, tmp_path_factory.mktemp("service"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        # The image drains for ANOMALY_SHUTDOWN_DRAIN_SECONDS on SIGTERM; a second SIGTERM
        # stops at once (service/shutdown.py): use it, and check the exit is clean.
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        rc = stop_process(srv.proc, timeout=20)
        assert rc in (0, -signal.SIGTERM), f"exit status {rc}:\n{srv.output()}"
        assert "Traceback" not in srv.output(), srv.output()


# -- Prometheus --------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def api(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, r.text)
        return body["data"]

    def query(self, expr: str) -> list:
        """Instant query; the result vector (Prometheus rejects what does not parse)."""
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [data["result"]]


@pytest.fixture(scope="session")
def prometheus(service, tmp_path_factory):
    """A real Prometheus on 127.0.0.1 running the shipped prometheus.yml and rule files.

    Substituted in the copies (in a temporary folder): the scrape target (the local service
    instead of anomaly:8000) and the scrape and rule evaluation intervals (1 s).
    """
    binary = require_binary(PROMETHEUS, "prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    text = (PROM_DIR / "prometheus.yml").read_text()
    assert text.count("anomaly:8000") == 1, "the shipped scrape target is anomaly:8000"
    config = yaml.safe_load(text.replace("anomaly:8000", f"127.0.0.1:{service.port}"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        job.update(scrape_interval="1s", scrape_timeout="1s")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    for name in config["rule_files"]:
        rules = yaml.safe_load((PROM_DIR / name).read_text())
        for group in rules["groups"]:
            if "interval" in group:
                group["interval"] = "1s"
        (work / name).write_text(yaml.safe_dump(rules))
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=work)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
            return httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200

        wait_for(ready, 30, "Prometheus to be ready")
        wait_for(lambda: prom.query('up{job="anomaly"} == 1'), 20, "a first scrape")
        yield prom
    finally:
        stop_process(proc, timeout=10)


# -- traffic --------------------------------------------------------------------------------------
def send_traffic(url: str, seconds: float = 4.0, min_rounds: int = 10, max_rounds: int = 60,
                 limit: float = 30.0) -> int:
    """Score normal and anomalous images through v1 (default version and v1) and V2, and send
    bad input: rounds for at least ``seconds`` (several scrapes) and ``min_rounds`` rounds (240
    scores for the drift window of the default version), at most ``max_rounds`` rounds or
    ``limit`` seconds. Returns the rounds sent."""
    normal, odd = blobs(12, seed=7), bars(4, seed=8)
    batch = np.concatenate([normal, odd]).tolist()
    v2_body = {"inputs": [{"name": "images", "shape": [8, 28, 28], "datatype": "FP32",
                           "data": blobs(8, seed=9).ravel().tolist()}]}
    non_finite = json.dumps({"images": [[[float("nan")] * 28] * 28]})  # NaN: not strict JSON
    start = time.monotonic()
    rounds = 0

    def more() -> bool:
        elapsed = time.monotonic() - start
        return (rounds < max_rounds and elapsed < limit
                and (rounds < min_rounds or elapsed < seconds))

    with httpx.Client(base_url=url, timeout=30) as c:
        while more():
            assert c.post("/v1/models/blobs/score", json={"images": batch}).status_code == 200
            r = c.post("/v1/models/blobs/versions/v1/score",
                       json={"images": batch[:8], "operating_point": "fpr@10%"})
            assert r.status_code == 200, r.text
            assert c.post("/v2/models/blobs/infer", json=v2_body).status_code == 200
            bad = c.post("/v1/models/blobs/score", json={"images": [[[0] * 27] * 28]})
            assert bad.status_code == 422, bad.text
            nan = c.post("/v1/models/blobs/score", content=non_finite,
                         headers={"content-type": "application/json"})
            assert nan.status_code in (400, 422), nan.text
            rounds += 1
            time.sleep(0.15)
    return rounds


@pytest.fixture(scope="session")
def traffic(service, prometheus) -> dict[str, str]:
    """Traffic over several scrapes, then every recording rule evaluated with data.

    Returns the concrete values of the dashboard variables for the live queries.
    """
    rounds = send_traffic(service.url)
    assert rounds >= 10, f"only {rounds} rounds of traffic"
    instance = f"127.0.0.1:{service.port}"

    def recorded():
        return all(prometheus.query(r["record"]) for r in helpers.rules() if "record" in r)

    wait_for(recorded, 30, "every recording rule to have data", interval=0.5)
    return {"job": "anomaly", "model": "blobs", "version": "v2", "instance": instance,
            "__rate_interval": "5m", "__interval": "15s", "DS_PROMETHEUS": "prometheus"}
