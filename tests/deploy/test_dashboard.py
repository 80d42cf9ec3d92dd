"""The Grafana dashboard and its provisioning: structure, the panels the on-call engineer
needs, and every metric it names exported by the service's /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import helpers
from tests.deploy.conftest import send_traffic
from tests.deploy.helpers import DEPLOY

DASH = helpers.dashboard()
PANELS = [p for p in helpers.all_panels(DASH) if p["type"] != "row"]


def by_title(fragment: str) -> dict:
    found = [p for p in PANELS if fragment.lower() in p["title"].lower()]
    assert len(found) == 1, f"one panel titled like {fragment!r}: {[p['title'] for p in found]}"
    return found[0]


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def test_fixed_uid_variables_and_rows():
    assert DASH["uid"] == "anomaly-service" and DASH["title"]
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query" and not job["multi"] and not job["includeAll"]
    assert job["current"]["value"] == "anomaly"  # prometheus.yml's job name, the k8s Service's
    assert helpers.variable_queries(DASH)["job"] == "label_values(anomaly_build_info, job)"
    for name in ("model", "version", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["allValue"] == ".*", f"{name}: 'All' must also match the '' and _other labels"
    rows = [p["title"].split(":")[0] for p in DASH["panels"] if p["type"] == "row"]
    assert rows == ["RED", "Saturation", "ML"]


def test_import_asks_for_the_data_source():
    """Grafana's import replaces ``${DS_PROMETHEUS}`` with the data source picked for the
    ``__inputs`` entry; file provisioning does not read ``__inputs`` and resolves the same
    ``${DS_PROMETHEUS}`` as the data source variable of that name instead (defaulting to the
    default Prometheus). Both work only if every reference is ``${DS_PROMETHEUS}``."""
    (ds,) = DASH["__inputs"]
    assert (ds["name"], ds["type"], ds["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert variables[ds["name"]]["type"] == "datasource"
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict | str):
                refs.append(node["datasource"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in DASH.items() if k != "__inputs"})
    assert len(refs) >= len(PANELS) + len(helpers.variable_queries(DASH))
    bad = [r for r in refs if r != {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}]
    assert not bad, bad
    required = {(r["type"], r["id"]) for r in DASH["__requires"]}
    assert {("panel", p["type"]) for p in PANELS} | {("datasource", "prometheus")} <= required
    # The Grafana it is made for: the one docker compose runs.
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    (grafana,) = [r["version"] for r in DASH["__requires"] if r["type"] == "grafana"]
    assert compose["services"]["grafana"]["image"] == f"grafana/grafana:{grafana}"


def test_every_query_selects_the_job_variable():
    """No hard-coded job: each metric selector of each panel and variable query carries
    ``job=~"$job"`` (except the job variable's own query), so the dashboard works whatever
    the scrape job is called and never mixes two deployments scraped by one Prometheus."""
    queries = [e for _, e in helpers.dashboard_queries(DASH)]
    queries += [q[q.index("(") + 1: q.rindex(",")]  # label_values(SELECTOR, label)
                for name, q in helpers.variable_queries(DASH).items() if name != "job"]
    for expr in queries:
        assert 'job="' not in expr, expr
        for name in helpers.metric_names(expr):
            selectors = re.findall(rf"(?<![\w:]){re.escape(name)}(\{{[^}}]*\}})?", expr)
            assert selectors and all('job=~"$job"' in s for s in selectors), (name, expr)


def test_layout_ids_and_datasource():
    ids = [p["id"] for p in helpers.all_panels(DASH)]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in helpers.all_panels(DASH):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    for p in PANELS:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in {"job", "model", "version", "instance", "__rate_interval"}, (p["title"], var)


def test_red_panels():
    rate = by_title("request rate")
    assert "rate(anomaly_requests_total" in exprs(rate)[0]
    errors = by_title("error ratio")
    assert any('outcome="server_error"' in e for e in exprs(errors))
    latency = by_title("latency")
    for q in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, ") and
                   "rate(anomaly_request_duration_seconds_bucket" in e for e in exprs(latency)), q


def test_saturation_panels():
    assert "anomaly_requests_in_flight" in exprs(by_title("in flight"))[0]
    batch = " ".join(exprs(by_title("per request and per model call")))
    assert "anomaly_request_batch_size" in batch and "anomaly_inference_batch_size" in batch
    assert "rate(process_cpu_seconds_total" in exprs(by_title("CPU"))[0]
    assert "process_resident_memory_bytes" in exprs(by_title("memory"))[0]


def test_ml_panels():
    rate = exprs(by_title("anomaly rate vs expected"))
    assert "anomaly_flagged_images_total" in rate[0] and "anomaly_images_scored_total" in rate[0]
    assert "anomaly_expected_anomaly_ratio" in rate[1]
    heat = by_title("score distribution")
    assert heat["type"] == "heatmap" and heat["targets"][0]["format"] == "heatmap"
    assert "anomaly_score_bucket" in heat["targets"][0]["expr"]
    assert "by (reason)" in exprs(by_title("rejected inputs"))[0]
    drift = " ".join(exprs(by_title("drift")))
    assert "anomaly_score_drift_ks" in drift and "anomaly_score_drift_psi" in drift
    info = by_title("versions in service")
    assert info["type"] == "table" and "sha256" in exprs(info)[0]


@pytest.fixture(scope="module")
def exported(service) -> set[str]:
    """Every sample name the service exports once it has scored something."""
    send_traffic(service.url, seconds=0, min_rounds=1, max_rounds=1)
    text = httpx.get(service.url + "/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_metric_is_exported_by_the_service(exported):
    used = set()
    for _, expr in helpers.dashboard_queries(DASH):
        used |= helpers.metric_names(expr)
    for query in helpers.variable_queries(DASH).values():
        used |= helpers.metric_names(query[query.index("(") + 1: query.rindex(",")])
    assert used, "no metric names found"
    assert not used - exported, f"not exported by /metrics: {sorted(used - exported)}"


def test_every_rule_metric_is_exported_or_recorded(exported):
    recorded = {r["record"] for r in helpers.rules() if "record" in r}
    used = set()
    for rule in helpers.rules():
        used |= helpers.metric_names(rule["expr"])
    assert not used - exported - recorded, sorted(used - exported - recorded)


def test_provisioning_points_at_the_compose_services():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "anomaly.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
