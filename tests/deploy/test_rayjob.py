"""The batch-scoring RayJob (deploy/k8s/examples/score-rayjob.yaml), beyond its CRD schema
(test_k8s.py checks it against KubeRay's, strictly): its entrypoint is a command line that this
project's own parser takes, for the Ray engine on the cluster it runs on; every Ray pod sees
the artifact, the input and the output at the same paths; the Ray version, the probes, the
resources and the retries are what its header says; and what KubeRay's operator refuses
although the schema allows it."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from anomaly import cli
from tests.deploy.helpers import DEPLOY, REPO
from tests.deploy.test_k8s import DOCS, K8S, containers, models_claim, one, pod_specs

FILE = "examples/score-rayjob.yaml"
#: Ray answers the one HTTP health check the probes use (/api/healthz) from this version on.
HTTP_HEALTH_CHECK = Version("2.53.0")
AGENT_PORT = 52365  # the dashboard agent's default port, which KubeRay also pins
MAX_NAME = 47  # KubeRay: a RayJob name is a DNS-1035 label of at most 53 - 6 characters


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return one("RayJob", FILE)


def cluster_pods(job: dict) -> dict[str, dict]:
    """``{"head": pod spec, "worker/GROUP": pod spec, ...}``: the pods of the Ray cluster."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker/{group['groupName']}"] = group["template"]["spec"]
    return pods


def ray_container(pod: dict) -> dict:
    """KubeRay runs Ray in a pod's first container."""
    return pod["containers"][0]


def claim_mounts(pod: dict) -> dict[str, tuple[str, bool]]:
    """``{mount path: (claim, read-only)}`` of the Ray container's volume claims."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in ray_container(pod)["volumeMounts"]:
        claim = volumes[m["name"]].get("persistentVolumeClaim")
        if claim:
            assert claim.get("readOnly", False) == m.get("readOnly", False), m  # both, or neither
            out[m["mountPath"]] = (claim["claimName"], m.get("readOnly", False))
    return out


def entrypoint_args(job: dict):
    """The entrypoint parsed by the CLI's own parser (which exits on what it refuses)."""
    argv = shlex.split(job["spec"]["entrypoint"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"][argv[0]] == "anomaly.cli:main", argv
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = sub.choices[argv[1]]._option_string_actions
    # Spelt out: argparse also takes a prefix (--engin), which a new option can make ambiguous.
    assert not [a for a in argv if a.startswith("--") and a not in options], argv
    return parser.parse_args(argv[1:])


def under(path: str, mounts: dict) -> tuple[str, tuple[str, bool]]:
    """The mount path ``path`` lies under, and its (claim, read-only)."""
    found = [m for m in mounts if Path(path).is_relative_to(m)]
    assert len(found) == 1, (path, list(mounts))
    return found[0], mounts[found[0]]


def test_the_entrypoint_is_a_ray_engine_score_into_the_data_volume(rayjob):
    args = entrypoint_args(rayjob)
    assert args.func is cli.cmd_score
    assert (args.engine, args.address) == ("ray", "auto")  # the cluster the job runs on
    assert cli._is_folder_output(args.output), "--engine ray writes parts into a folder"
    mounts = claim_mounts(cluster_pods(rayjob)["head"])
    data = one("PersistentVolumeClaim", "examples/score-data-pvc.yaml")["metadata"]["name"]
    root, (claim, read_only) = under(args.output, mounts)
    assert claim == data and not read_only
    assert Path(args.output).relative_to(root).parts[0] == "scores"
    assert under(args.input, mounts)[1][0] == data
    assert not Path(args.output).is_relative_to(args.input), "a folder input lists sub-folders"
    # A pinned version, MODELS/NAME/VERSION: a model folder would mean its newest version,
    # which a retry after a new fit would find changed, and the resume check refuses.
    root, (claim, read_only) = under(args.artifact, mounts)
    assert claim == models_claim() and read_only
    assert len(Path(args.artifact).relative_to(root).parts) == 2, args.artifact
    assert "@" not in args.artifact  # NAME@VERSION looks in ./models, not the volume


def test_head_and_workers_see_the_volumes_at_the_same_paths(rayjob):
    """The driver (on the head) plans blocks as absolute paths the actors (on the workers)
    open, and both write into the output folder."""
    pods = cluster_pods(rayjob)
    mounts = {name: claim_mounts(pod) for name, pod in pods.items()}
    data = one("PersistentVolumeClaim", "examples/score-data-pvc.yaml")
    expected = {"/models": (models_claim(), True), "/data": (data["metadata"]["name"], False)}
    assert all(m == expected for m in mounts.values()), mounts
    assert "ReadWriteMany" in data["spec"]["accessModes"]
    assert "ReadWriteMany" in one("PersistentVolumeClaim", "models-pvc.yaml")["spec"]["accessModes"]
    # A read-only root filesystem: Ray's session files, HOME and KERAS_HOME go to /tmp.
    for pod in [*pods.values(), rayjob["spec"]["submitterPodTemplate"]["spec"]]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], c["name"]


def test_one_image_on_every_ray_pod(rayjob):
    """Head, workers and submitter run the same image (KubeRay's default submitter takes the
    head's): the Ray on each side of the job API is the same."""
    images = {pod["containers"][0]["image"] for pod in pod_specs(rayjob)}
    assert len(images) == 1 and len(pod_specs(rayjob)) >= 3, images  # head, workers, submitter


def test_the_ray_version_is_the_extras_and_the_images(rayjob):
    """rayVersion: what the `ray` extra allows, what the header's image recipe installs, and
    new enough for the HTTP probes."""
    version = Version(rayjob["spec"]["rayClusterSpec"]["rayVersion"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    (extra,) = [Requirement(r) for r in project["project"]["optional-dependencies"]["ray"]]
    assert extra.name == "ray" and version in extra.specifier, (version, extra)
    assert version >= HTTP_HEALTH_CHECK
    header = (K8S / FILE).read_text()
    (base,) = re.findall(r"^#\s+FROM (\S+)$", header, re.M)
    (pinned,) = re.findall(r'^#\s+RUN pip install .*"ray\[([\w,]+)\]==([\w.]+)"$', header, re.M)
    (tag,) = re.findall(r"^#\s+docker build -t (\S+) ", header, re.M)
    assert set(pinned[0].split(",")) == {"default", "data"}, pinned  # the dashboard, Ray Data
    assert Version(pinned[1]) == version
    compose = (DEPLOY / "docker-compose.yml").read_text()
    assert f"image: {base}" in compose, "the recipe starts from the service image"
    assert {c["image"] for c in containers(rayjob)} == {tag}


def test_probes_ask_the_dashboard_agent(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    params = [cluster["headGroupSpec"]["rayStartParams"],
              *(g["rayStartParams"] for g in cluster["workerGroupSpecs"])]
    for pod, start in zip(cluster_pods(rayjob).values(), params, strict=True):
        c = ray_container(pod)
        port = int(start.get("dashboard-agent-listen-port", AGENT_PORT))
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/api/healthz", "port": port}, (c["name"], probe)


def test_resources_one_actor_per_worker_cpu_none_on_the_head(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for name, pod in cluster_pods(rayjob).items():
        res = ray_container(pod)["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), (name, kind)
        if name.startswith("worker/"):
            # Ray counts the limit as the worker's CPUs, one actor each: whole CPUs, and
            # requests equal to limits (Guaranteed: no throttling, evicted last).
            assert res["requests"] == res["limits"], name
            assert str(res["limits"]["cpu"]).isdigit() and int(res["limits"]["cpu"]) >= 1
    for group in cluster["workerGroupSpecs"]:
        assert "num-cpus" not in group["rayStartParams"]  # from the limit, as the header says
        # The actor pool is sized once, when the job starts: a fixed number of workers.
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] >= 1
    assert cluster.get("enableInTreeAutoscaling", False) is False
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"cpu", "memory"} <= set(submitter["resources"]["limits"])


def test_lifecycle_retries_and_submitter(rayjob):
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"  # a plain string in the CRD: not checked there
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1, "a retry resumes, so allow some"
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] in ("Never", "OnFailure")  # a Job's pod template
    (c,) = submitter["containers"]
    assert "command" not in c and "args" not in c, "KubeRay fills in `ray job submit`"


def test_what_kuberay_refuses(rayjob):
    """The operator's own checks (ray-operator/controllers/ray/utils/validation.go) and what
    it relies on, where the schema has no say."""
    name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_NAME, name
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        # ray start's resource flags, or the group's `resources`: not both.
        assert not (set(group["rayStartParams"]) & {"num-cpus", "num-gpus", "memory",
                                                    "resources"} and group.get("resources"))
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    # The submitter reaches the job API through the head Service's port named "dashboard".
    head = ray_container(cluster_pods(rayjob)["head"])
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"] == 8265
    assert len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(
        cluster["workerGroupSpecs"])


def test_the_rayjob_file_holds_nothing_else():
    """kubectl delete -f on the RayJob's file must not take the data volume with it."""
    kinds = {d["kind"] for f, d in DOCS if f == FILE}
    assert kinds == {"RayJob"}
