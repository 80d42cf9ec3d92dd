"""The Kubernetes manifests, checked structurally in Python (no cluster, and Debian's kubectl
is 1.20, older than autoscaling/v2): kinds and apiVersions, required fields, probes, the
security context, the read-only model volume, and that the objects reference each other
consistently (selectors, ports, names, image, the adapter's metric, the shipped rules)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from service import metrics
from service.settings import Settings
from tests.deploy import helpers
from tests.deploy.helpers import DEPLOY, REPO

K8S = DEPLOY / "k8s"
API = {
    "Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1", "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1", "PersistentVolumeClaim": "v1",
    "Job": "batch/v1", "InferenceService": "serving.kserve.io/v1beta1",
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
NOT_OBJECTS = {"prometheus-adapter-values.yaml"}  # Helm values


def load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name in NOT_OBJECTS:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


DOCS = load()


def one(kind: str, file: str | None = None) -> dict:
    found = [d for f, d in DOCS if d["kind"] == kind and (file is None or f == file)]
    assert len(found) == 1, (kind, file, len(found))
    return found[0]


def containers(obj: dict) -> list[dict]:
    if obj["kind"] == "ServingRuntime":
        return obj["spec"]["containers"]
    return obj["spec"]["template"]["spec"]["containers"]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("file, doc", DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_every_object_is_well_formed(file, doc):
    assert API.get(doc["kind"]) == doc["apiVersion"], (file, doc["kind"], doc["apiVersion"])
    if doc["kind"] == "Kustomization":
        return
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    assert "namespace" not in doc["metadata"], "the namespace is set by kustomize / kubectl -n"
    assert "spec" in doc
    for key, value in doc["metadata"].get("labels", {}).items():
        assert isinstance(value, str), (key, value)


def test_kustomization_lists_the_service_manifests():
    kust = one("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_OBJECTS - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert {i["name"] for i in kust["images"]} == {"anomaly"}


def test_deployment_probes_shutdown_and_resources():
    dep = one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert selects(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert dep["spec"]["replicas"] >= 2
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    e = env(c)
    assert ports["http"] == int(e["ANOMALY_PORT"]) and e["ANOMALY_HOST"] == "0.0.0.0"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        assert c[probe]["httpGet"]["path"] == path and c[probe]["httpGet"]["port"] in ports, probe
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    budget = int(sleep[1]) + float(e["ANOMALY_SHUTDOWN_DRAIN_SECONDS"]) + float(
        e["ANOMALY_GRACEFUL_SHUTDOWN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > budget
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def test_deployment_security_and_read_only_models():
    dep = one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    _, runtime = helpers.stages(helpers.dockerfile_instructions())
    image_uid = [a for i, a in runtime if i == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[env(c)["ANOMALY_MODELS_DIR"]]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    assert models["persistentVolumeClaim"]["readOnly"] is True
    assert models["persistentVolumeClaim"]["claimName"] == one("PersistentVolumeClaim")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # HOME and KERAS_HOME (Dockerfile)


def test_every_anomaly_variable_is_a_setting_or_known_to_the_code():
    fields = {f"ANOMALY_{n.upper()}" for n in Settings.model_fields}
    source = " ".join(p.read_text() for p in (REPO / "anomaly").rglob("*.py"))
    for _, doc in DOCS:
        if doc["kind"] in ("Deployment", "Job", "ServingRuntime"):
            for c in containers(doc):
                for name in env(c):
                    if name.startswith("ANOMALY_"):
                        assert name in fields or name in source, (doc["kind"], name)


def test_service_servicemonitor_pdb_and_hpa_reference_the_deployment():
    dep, svc = one("Deployment"), one("Service", "service.yaml")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert selects(svc["spec"]["selector"], pod_labels)
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    sm = one("ServiceMonitor")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [port["name"]]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # The job label prometheus-operator gives the targets is the Service name: the dashboard's.
    assert svc["metadata"]["name"] == "anomaly"
    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], "apps/v1")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert "cpu" in c["resources"]["requests"]  # utilization is relative to the request
    pods_metric = kinds["Pods"]["pods"]["metric"]["name"]
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric
    assert rule["seriesQuery"].startswith(metrics.IN_FLIGHT._name + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_prometheusrule_carries_the_shipped_rules():
    assert one("PrometheusRule")["spec"]["groups"] == helpers.rule_groups()


def test_multi_worker_fit_job():
    job = one("Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    headless = [d for f, d in DOCS if d["kind"] == "Service" and f.startswith("examples/")]
    (svc,) = headless
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    (c,) = pod["containers"]
    script = " ".join(c["command"] + c["args"])
    assert "TF_CONFIG" in script and "$JOB_COMPLETION_INDEX" in script
    assert "anomaly fit" in script and "--distribute multi-worker" in script
    assert int(env(c)["WORKERS"]) == spec["completions"]
    assert f"{job['metadata']['name']}-$i.{svc['metadata']['name']}" in script
    # The TF_CONFIG the script builds, for worker 1 of 2, is valid JSON with the cluster.
    hosts = ",".join(f'"anomaly-fit-{i}.anomaly-fit:2222"' for i in range(2))
    built = json.loads('{"cluster": {"worker": [' + hosts + ']}, "task": {"type": "worker", "index": 1}}')
    assert built["task"]["index"] == 1 and len(built["cluster"]["worker"]) == 2
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {one("PersistentVolumeClaim")["metadata"]["name"]}


def test_kserve_inference_service_uses_the_v2_protocol():
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (c,) = runtime["spec"]["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [int(env(c)["ANOMALY_PORT"])]
    assert env(c)["ANOMALY_MODELS_DIR"] == "/mnt/models"  # where KServe mounts storageUri
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_one_image_and_non_root_everywhere():
    images = set()
    for _, doc in DOCS:
        if doc["kind"] not in ("Deployment", "Job", "ServingRuntime"):
            continue
        pod_sc = {} if doc["kind"] == "ServingRuntime" else doc["spec"]["template"]["spec"].get("securityContext", {})
        for c in containers(doc):
            images.add(c["image"])
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, doc["kind"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert images == {compose["services"]["anomaly"]["image"]}
