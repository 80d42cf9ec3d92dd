"""The Kubernetes manifests, without a cluster: every object validated against the API's own
schemas, strictly (an unknown field is an error, as with ``kubectl apply --validate=strict``):
the built-in kinds by ``kubernetes-validate`` (it bundles the schemas of each Kubernetes
release), the custom resources by ``check-jsonschema`` against the CRD schemas vendored in
``schemas/``. Then what no schema knows: probes, the security context, the read-only model
volume, and that the objects reference each other consistently (selectors, ports, names,
image, the adapter's metric, the shipped rules)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.deploy import helpers
from tests.deploy.helpers import DEPLOY, REPO, require_tool

K8S = DEPLOY / "k8s"
API = {
    "Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1", "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1", "PersistentVolumeClaim": "v1",
    "Job": "batch/v1", "InferenceService": "serving.kserve.io/v1beta1",
    "ServingRuntime": "serving.kserve.io/v1alpha1", "RayJob": "ray.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
NOT_OBJECTS = {"prometheus-adapter-values.yaml"}  # Helm values
SCHEMAS = Path(__file__).parent / "schemas"
# Custom resources: the JSON schema converted from the published CRD (schemas/README.md).
CRD_SCHEMAS = {
    "ServiceMonitor": SCHEMAS / "servicemonitor_v1.json",
    "PrometheusRule": SCHEMAS / "prometheusrule_v1.json",
    "InferenceService": SCHEMAS / "inferenceservice_v1beta1.json",
    "ServingRuntime": SCHEMAS / "servingruntime_v1alpha1.json",
    "RayJob": SCHEMAS / "rayjob_v1.json",
}
# Neither: kustomize's own file, which kubectl reads and never sends to the API server.
NO_SCHEMA = {"Kustomization"}
#: The kinds that run this project's image.
WORKLOADS = ("Deployment", "Job", "ServingRuntime", "RayJob")
MIN_KUBERNETES = (1, 37)


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


def run_tool(argv: list, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def kubernetes_validate() -> tuple[list[str], str]:
    """The command and the newest Kubernetes version it bundles (at least 1.37)."""
    cmd = require_tool("kubernetes_validate", "kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    assert tuple(int(n) for n in version.split(".")[:2]) >= MIN_KUBERNETES, version
    return cmd, version


@pytest.fixture(scope="module")
def check_jsonschema() -> list[str]:
    return require_tool("check_jsonschema", "check-jsonschema")


def builtin_files() -> list[Path]:
    """The manifest files holding built-in kinds (no CRD, no Kustomization)."""
    files = {f for f, d in DOCS if d["kind"] not in CRD_SCHEMAS and d["kind"] not in NO_SCHEMA}
    return [K8S / f for f in sorted(files)]


def validate_builtin(kubernetes_validate, paths) -> tuple[int, str]:
    cmd, version = kubernetes_validate
    done = run_tool([*cmd, "--strict", "--kubernetes-version", version, *paths])
    return done.returncode, done.stdout + done.stderr


def test_every_custom_resource_has_a_vendored_schema(kubernetes_validate):
    """Nothing escapes validation: kubernetes-validate only warns about a kind it does not
    bundle, so each of those must have a vendored CRD schema (the built-in ones must all
    pass kubernetes-validate, below)."""
    from kubernetes_validate.utils import SchemaNotFoundError, validate

    _, version = kubernetes_validate
    for file, doc in DOCS:
        if doc["kind"] in CRD_SCHEMAS:
            assert CRD_SCHEMAS[doc["kind"]].is_file(), (file, doc["kind"])
            with pytest.raises(SchemaNotFoundError):
                validate(doc, version, strict=True)


def test_builtin_objects_pass_kubernetes_validate_strict(kubernetes_validate):
    """Deployment, Services, HPA, PDB, PVCs and the fit Job against the newest bundled API."""
    paths = builtin_files()
    rc, out = validate_builtin(kubernetes_validate, paths)
    assert rc == 0, out
    _, version = kubernetes_validate
    minor = ".".join(version.split(".")[:2])
    passed = set(re.findall(rf"passed for resource (\S+) against version {re.escape(minor)}", out))
    expected = {f"{d['kind'].lower()}/{d['metadata']['name']}" for f, d in DOCS
                if K8S / f in paths}
    assert {"deployment/anomaly", "service/anomaly", "horizontalpodautoscaler/anomaly",
            "poddisruptionbudget/anomaly", "persistentvolumeclaim/anomaly-models",
            "persistentvolumeclaim/anomaly-data", "job/anomaly-fit"} <= expected
    assert passed == expected, out


MISTAKES = {  # what a schema catches and a YAML parser does not: file, old, new, the error
    "a misspelt field": ("deployment.yaml", "readinessProbe:", "readinesProbe:",
                         "'readinesProbe' was unexpected"),
    "a string for an integer": ("deployment.yaml", "replicas: 2", "replicas: two",
                                "spec.replicas: 'two' is not of type 'integer'"),
    "an unknown field in the HPA": ("hpa.yaml", "  minReplicas: 2",
                                    "  minReplicas: 2\n  minReplica: 2",
                                    "'minReplica' was unexpected"),
}


@pytest.mark.parametrize("mistake", MISTAKES, ids=list(MISTAKES))
def test_kubernetes_validate_strict_rejects(kubernetes_validate, tmp_path, mistake):
    name, old, new, error = MISTAKES[mistake]
    text = (K8S / name).read_text()
    assert old in text, (name, old)
    bad = tmp_path / name
    bad.write_text(text.replace(old, new, 1))
    rc, out = validate_builtin(kubernetes_validate, [bad])
    assert rc != 0 and "did not validate" in out and error in out, out


def crd_instances(tmp_path: Path, docs) -> dict[str, list[Path]]:
    """kind -> one JSON file per object (check-jsonschema reads one document per file)."""
    out: dict[str, list[Path]] = {}
    for i, (file, doc) in enumerate(docs):
        if doc["kind"] in CRD_SCHEMAS:
            path = tmp_path / f"{i}-{Path(file).stem}-{doc['kind'].lower()}.json"
            path.write_text(json.dumps(doc))
            out.setdefault(doc["kind"], []).append(path)
    return out


def test_custom_resources_pass_their_crd_schemas(check_jsonschema, tmp_path):
    """ServiceMonitor, PrometheusRule, KServe ServingRuntime and InferenceService, KubeRay
    RayJob."""
    instances = crd_instances(tmp_path, DOCS)
    assert set(instances) == set(CRD_SCHEMAS)
    for kind, paths in instances.items():
        done = run_tool([*check_jsonschema, "--schemafile", CRD_SCHEMAS[kind], *paths])
        assert done.returncode == 0, f"{kind}:\n{done.stdout}{done.stderr}"


def test_custom_resources_metadata_is_object_meta(kubernetes_validate):
    """A CRD's schema leaves ``metadata`` open; the API server checks it as ObjectMeta, so
    check it as the ObjectMeta of a built-in kind (a ConfigMap's) against the bundled schema."""
    from kubernetes_validate.utils import ValidationError, validate

    _, version = kubernetes_validate
    for _, doc in DOCS:
        if doc["kind"] in CRD_SCHEMAS:
            validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                     version, strict=True)
    with pytest.raises(ValidationError, match="'lables' was unexpected"):  # it can fail
        validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "lables": {}}},
                 version, strict=True)


CRD_MISTAKES = {
    "ServiceMonitor": (["spec", "endpoints", 0], "scrapeTimout", "5s"),  # misspelt
    "PrometheusRule": (["spec", "groups", 0, "rules", 0], "expression", "up"),
    "InferenceService": (["spec", "predictor"], "minReplicas", "one"),  # not an integer
    "ServingRuntime": (["spec", "containers", 0, "ports", 0], "containerPort", "http"),
    # ray start's flags are a map of strings in the CRD: a bare number is refused.
    "RayJob": (["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"], "num-cpus", 0),
}


@pytest.mark.parametrize("kind", CRD_MISTAKES, ids=list(CRD_MISTAKES))
def test_crd_schemas_reject_mistakes(check_jsonschema, tmp_path, kind):
    where, key, value = CRD_MISTAKES[kind]
    (doc,) = [json.loads(json.dumps(d)) for _, d in DOCS if d["kind"] == kind]
    node = doc
    for step in where:
        node = node[step]
    node[key] = value
    (path,) = crd_instances(tmp_path, [("bad.yaml", doc)])[kind]
    done = run_tool([*check_jsonschema, "--schemafile", CRD_SCHEMAS[kind], path])
    assert done.returncode == 1 and key in done.stdout, done.stdout + done.stderr


def one(kind: str, file: str | None = None) -> dict:
    found = [d for f, d in DOCS if d["kind"] == kind and (file is None or f == file)]
    assert len(found) == 1, (kind, file, len(found))
    return found[0]


def models_claim() -> str:
    """The models volume's claim name (examples/ add a data volume for batch scoring)."""
    return one("PersistentVolumeClaim", "models-pvc.yaml")["metadata"]["name"]


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs of a workload: a RayJob has its head's, each worker group's and its
    submitter's."""
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster["workerGroupSpecs"]),
                obj["spec"]["submitterPodTemplate"]["spec"]]
    return [obj["spec"]["template"]["spec"]]


def containers(obj: dict) -> list[dict]:
    if obj["kind"] == "ServingRuntime":
        return obj["spec"]["containers"]
    return [c for pod in pod_specs(obj) for c in pod["containers"]]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("file, doc", DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_every_object_is_well_formed(file, doc):
    """What the schemas leave to the API server: the API versions we ship for (the newest
    stable ones), DNS-label names, and no namespace (kustomize or kubectl -n sets it)."""
    assert API.get(doc["kind"]) == doc["apiVersion"], (file, doc["kind"], doc["apiVersion"])
    if doc["kind"] == "Kustomization":
        return
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    assert "namespace" not in doc["metadata"], "the namespace is set by kustomize / kubectl -n"


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
    assert models["persistentVolumeClaim"]["claimName"] == models_claim()
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # HOME and KERAS_HOME (Dockerfile)


def test_every_anomaly_variable_is_a_setting_or_known_to_the_code():
    fields = {f"ANOMALY_{n.upper()}" for n in Settings.model_fields}
    source = " ".join(p.read_text() for p in (REPO / "anomaly").rglob("*.py"))
    for _, doc in DOCS:
        if doc["kind"] in WORKLOADS:
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
    # The service exports it: test_prometheus.py queries the adapter's rule on a live one.
    assert rule["seriesQuery"].startswith("anomaly_requests_in_flight{")
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
    assert claims == {models_claim()}


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
    """The service's image everywhere (the light install, deploy/docker/Dockerfile's default),
    but training's, which is the full build of the same version (``EXTRAS=full``, ``-full``),
    and the RayJob's, the same with Ray added (its header says how), ``-ray``."""
    images, training, ray_images = set(), set(), set()
    for _, doc in DOCS:
        if doc["kind"] not in WORKLOADS:
            continue
        pods = ([{"containers": containers(doc)}] if doc["kind"] == "ServingRuntime"
                else pod_specs(doc))
        for pod in pods:
            pod_sc = pod.get("securityContext", {})
            for c in pod["containers"]:
                kind = doc["kind"]
                (ray_images if kind == "RayJob" else training if kind == "Job"
                 else images).add(c["image"])
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, doc["kind"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    image = compose["services"]["anomaly"]["image"]
    assert images == {image}
    assert training == {f"{image}-full"}
    assert ray_images == {f"{image}-ray"}
