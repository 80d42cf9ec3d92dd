"""The shipped Prometheus files: promtool's checks and unit tests, then a real Prometheus
scraping the real service, where every query of the dashboard, of the alert and recording
rules and of the prometheus-adapter rule must parse and return data."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy import helpers
from tests.deploy.helpers import DEPLOY, PROM_DIR


def run(argv, cwd=PROM_DIR) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


# -- promtool -------------------------------------------------------------------------------------
def test_promtool_check_config(promtool):
    out = run([promtool, "check", "config", "prometheus.yml"])
    assert "SUCCESS" in out and "2 rule files found" in out, out


def test_promtool_check_rules(promtool, tmp_path):
    files = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["rule_files"]
    assert set(files) == {"recording_rules.yml", "alerts.yml"}
    out = run([promtool, "check", "rules", *files])
    assert out.count("SUCCESS") == len(files), out
    # The PrometheusRule for prometheus-operator carries the same groups.
    doc = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    (tmp_path / "operator.yml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    assert "SUCCESS" in run([promtool, "check", "rules", tmp_path / "operator.yml"])


def test_promtool_unit_tests_of_every_alert(promtool):
    out = run([promtool, "test", "rules", "alerts_test.yml"])
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_and_a_silent_case():
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    firing, silent = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    alerts = {r["alert"] for r in helpers.rules() if "alert" in r}
    assert alerts, "no alerts found"
    assert alerts <= firing, f"alerts never tested firing: {alerts - firing}"
    assert alerts <= silent, f"alerts never tested silent: {alerts - silent}"


def test_alerts_have_severity_summary_and_runbook_in_the_docs():
    docs = (helpers.REPO / "docs" / "monitoring.md").read_text()
    for rule in helpers.rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert f"### {rule['alert']}" in docs, f"{rule['alert']} is not explained in the docs"


# -- a real Prometheus ------------------------------------------------------------------------------
def test_target_is_scraped_and_every_rule_evaluates(prometheus, traffic, service):
    targets = prometheus.api("targets")["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("anomaly", "up")], targets
    assert targets[0]["labels"]["instance"] == traffic["instance"]
    groups = prometheus.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    shipped = {r.get("record") or r["alert"] for r in helpers.rules()}
    assert set(loaded) == shipped
    bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    assert not bad, bad


RECORDS = [r for r in helpers.rules() if "record" in r]
ALERTS = [r for r in helpers.rules() if "alert" in r]


@pytest.mark.parametrize("rule", RECORDS, ids=[r["record"] for r in RECORDS])
def test_recording_rule_returns_data(prometheus, traffic, rule):
    assert prometheus.query(rule["expr"]), f"no data: {rule['expr']}"
    assert prometheus.query(rule["record"]), f"nothing recorded as {rule['record']}"


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_alert_expression_parses_and_its_operands_return_data(prometheus, traffic, rule):
    """The whole expression parses (it is empty unless the alert would fire); each side of
    its comparisons and and/or operators returns data, so the alert can fire."""
    prometheus.query(rule["expr"])
    parts = [p for p in helpers.operands(rule["expr"]) if not helpers.is_number(p)]
    assert parts, rule["expr"]
    empty = [p for p in parts if not prometheus.query(p)]
    assert not empty, f"{rule['alert']}: no data for {empty}"


QUERIES = helpers.dashboard_queries(helpers.dashboard())


@pytest.mark.parametrize("title, expr", QUERIES, ids=[t for t, _ in QUERIES])
def test_dashboard_query_returns_data(prometheus, traffic, title, expr):
    result = prometheus.query(helpers.substitute(expr, traffic))
    assert result, f"{title}: no data for {helpers.substitute(expr, traffic)}"


def test_dashboard_variables_list_the_live_values(prometheus, traffic):
    """Each label_values(selector, label) variable has the value the live queries use."""
    for name, query in helpers.variable_queries(helpers.dashboard()).items():
        inner = query[query.index("(") + 1: query.rindex(")")]
        selector, _, label = inner.rpartition(",")
        selector = helpers.substitute(selector.strip(), traffic)
        label = label.strip()
        values = {r["metric"].get(label) for r in
                  prometheus.query(f"count by ({label}) ({selector})")}
        assert traffic[name] in values, (name, query, values)


def test_every_metric_of_the_queries_has_series(prometheus, traffic):
    names = set()
    for _, expr in QUERIES:
        names |= helpers.metric_names(expr)
    for rule in helpers.rules():
        names |= helpers.metric_names(rule["expr"])
    missing = [n for n in sorted(names) if not prometheus.query(f'count({{__name__="{n}"}})')]
    assert not missing, missing


def test_prometheus_adapter_rule_returns_data(prometheus, traffic):
    """The HPA's custom metric: the adapter's query, with its template filled in as the
    adapter does for one pod (here: one instance)."""
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert prometheus.query(series), series
    query = (rule["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", f'instance="{traffic["instance"]}"')
             .replace("<<.GroupBy>>", "instance"))
    result = prometheus.query(query)
    assert len(result) == 1 and float(result[0]["value"][1]) >= 0, result
