"""deploy/docker-compose.yml, valid for the Compose Specification: the service, Prometheus
with the shipped rules, Grafana with the shipped provisioning, every path it mounts present
(checked without Docker)."""

from __future__ import annotations

import subprocess

import yaml

from service.settings import Settings
from tests.deploy import helpers
from tests.deploy.helpers import DEPLOY, REPO

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def split_volume(volume: str) -> tuple[str, str]:
    """(host, container) of a short-syntax volume; the host may be ${VAR:-default}."""
    cut = volume.index("}") + 1 if volume.startswith("${") else volume.index(":")
    return volume[:cut], volume[cut + 1:].split(":")[0]


def mounts(service: str) -> dict[str, str]:
    """host path -> container path (options like :ro dropped) of a service's volumes."""
    return dict(split_volume(v) for v in SERVICES[service].get("volumes", []))


def test_compose_file_matches_the_compose_spec(tmp_path):
    """The Compose Specification's schema (vendored in check-jsonschema, offline), which
    rejects what `docker compose` would: unknown keys, wrong types."""
    cmd = [*helpers.require_tool("check_jsonschema", "check-jsonschema"), "--builtin-schema",
           "vendor.compose-spec"]
    done = subprocess.run([*cmd, str(DEPLOY / "docker-compose.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "docker-compose.yml"  # it can fail: a misspelt key
    bad.write_text((DEPLOY / "docker-compose.yml").read_text().replace("read_only:", "readonly:", 1))
    done = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "'readonly' was unexpected" in done.stdout, done.stdout


def test_services_and_pinned_images():
    assert set(SERVICES) == {"anomaly", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        image = SERVICES[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert set(COMPOSE["volumes"]) == {"prometheus-data", "grafana-data"}


def test_the_service_builds_from_the_dockerfile_with_read_only_models():
    svc = SERVICES["anomaly"]
    context = (DEPLOY / svc["build"]["context"]).resolve()
    assert context == REPO and (context / svc["build"]["dockerfile"]) == helpers.DOCKERFILE
    (models,) = [v for v in svc["volumes"] if ":/models" in v]
    assert models.endswith(":/models:ro")
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert svc["cap_drop"] == ["ALL"]
    env = svc["environment"]
    fields = {f"ANOMALY_{n.upper()}" for n in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    _, runtime = helpers.stages(helpers.dockerfile_instructions())
    port = helpers.env_of(runtime)["ANOMALY_PORT"]
    assert f"{port}:{port}" in svc["ports"]
    # Docker's SIGKILL must come after the drain and the graceful shutdown.
    grace = int(svc["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["ANOMALY_SHUTDOWN_DRAIN_SECONDS"]) + float(
        env["ANOMALY_GRACEFUL_SHUTDOWN_SECONDS"])


def test_prometheus_gets_the_shipped_config_and_scrapes_the_service():
    prom = SERVICES["prometheus"]
    m = mounts("prometheus")
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    assert m["./prometheus/prometheus.yml"] == config_path
    config = yaml.safe_load((helpers.PROM_DIR / "prometheus.yml").read_text())
    config_dir = config_path.rsplit("/", 1)[0]
    for rule_file in config["rule_files"]:  # resolved next to the config file
        assert m[f"./prometheus/{rule_file}"] == f"{config_dir}/{rule_file}"
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in SERVICES and f"{port}:{port}" in SERVICES[host]["ports"]
    assert job["job_name"] == "anomaly"  # what the dashboard's process_* panels select


def test_every_host_path_exists():
    for name in SERVICES:
        for host in mounts(name):
            if host.startswith("./"):
                assert (DEPLOY / host).exists(), f"{name}: {host}"
            elif host.startswith("${"):
                assert ":-" in host, f"{name}: {host} needs a default"
                default = host[host.index(":-") + 2: -1]
                assert default.startswith("../") or default.startswith("./"), host
            else:
                assert host in COMPOSE["volumes"], f"{name}: {host}"
