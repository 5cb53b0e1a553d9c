"""Who may reach a RayJob's pods: that job's own pods, and nobody else.

    label_ray_pods(rayjob)                        every pod of the RayJob labelled with its name
    network_policy(rayjob, template)              the NetworkPolicy that admits only those pods
    fence_rayjob(api_client, rayjob, template)    create it, owned by the (created) RayJob

A Ray head listens on its GCS (6379), dashboard and job API (8265) and Ray client (10001) ports,
and the workers on many more; whoever reaches them can run code in the job. Each RayJob's head,
workers and submitter carry the label `kdflow/rayjob: <the RayJob's name>`, and the RayJob's
NetworkPolicy (infra/kuberay/networkpolicy.yaml, filled here) admits traffic to those pods only
from pods with that same label. infra/k8s/networkpolicy.yaml closes the Ray pods to everyone else
but the KubeRay operator's job API calls, and Ray's token authentication (the templates'
`authOptions`) asks every caller for the cluster's own token on top.

The policy is owned by the RayJob (an ownerReference, which needs the uid the API server gave the
RayJob), so Kubernetes deletes it with the RayJob.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

RAYJOB_LABEL = "kdflow/rayjob"
"""The label whose value, the RayJob's name, marks the pods of one job."""
POLICY_TEMPLATE_NAME = "networkpolicy.yaml"
"""The NetworkPolicy template, beside infra/kuberay/rayjob.yaml."""


def label_ray_pods(rayjob: dict[str, Any]) -> None:
    """Label the head, every worker group and the submitter pod of `rayjob` with its name."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    for template in templates:
        template.setdefault("metadata", {}).setdefault("labels", {})[RAYJOB_LABEL] = rayjob["metadata"]["name"]


def load_policy_template(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the RayJob NetworkPolicy template is missing; set KDFLOW_INFRA_DIR to the infra/ folder of kdflow"
        )
    return yaml.safe_load(path.read_text())


def network_policy(rayjob: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The NetworkPolicy of the created `rayjob`: every `kdflow/rayjob` label selector of the
    template (the pods it protects, the pods it admits) set to the RayJob's name, and the RayJob
    as its owner."""
    metadata = rayjob["metadata"]
    if not metadata.get("uid"):
        raise ValueError(f"RayJob {metadata['name']} has no uid: fence it after the API server created it")
    policy = _with_job_label(copy.deepcopy(template), metadata["name"])
    policy["metadata"].update(name=metadata["name"], namespace=metadata["namespace"])
    policy["metadata"]["ownerReferences"] = [
        {"apiVersion": rayjob["apiVersion"], "kind": rayjob["kind"], "name": metadata["name"], "uid": metadata["uid"]}
    ]
    return policy


def _with_job_label(node: Any, name: str) -> Any:
    if isinstance(node, dict):
        if RAYJOB_LABEL in node.get("matchLabels", {}):
            node["matchLabels"][RAYJOB_LABEL] = name
        for value in node.values():
            _with_job_label(value, name)
    elif isinstance(node, list):
        for value in node:
            _with_job_label(value, name)
    return node


def fence_rayjob(api_client, rayjob: dict[str, Any], template_path: Path) -> None:
    """Create the NetworkPolicy of the created `rayjob` through `api_client` (a
    `kubernetes.client.ApiClient`); one that exists already (a retried call) is kept."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    policy = network_policy(rayjob, load_policy_template(template_path))
    try:
        client.NetworkingV1Api(api_client).create_namespaced_network_policy(policy["metadata"]["namespace"], policy)
    except ApiException as err:
        if err.status != 409:
            raise
