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
    assert variables["datasource"]["type"] == "datasource"
    for name in ("model", "version", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["allValue"] == ".*", f"{name}: 'All' must also match the '' and _other labels"
    rows = [p["title"].split(":")[0] for p in DASH["panels"] if p["type"] == "row"]
    assert rows == ["RED", "Saturation", "ML"]


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
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in {"model", "version", "instance", "__rate_interval"}, (p["title"], var)


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
    assert "anomaly_anomalies_total" in rate[0] and "anomaly_images_scored_total" in rate[0]
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
