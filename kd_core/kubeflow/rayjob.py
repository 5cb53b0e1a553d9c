"""The distill and tune steps on a cluster: a KubeRay RayJob, submitted, watched and deleted by the
step's pod.

    build_rayjob(config, step, inputs, name)   the RayJob manifest, from infra/kuberay/rayjob.yaml
    watch_rayjob(api, name, ...)               poll its status, print every change, raise on failure
    run_step_rayjob(config, step, inputs)      all of it, with the RayJob deleted whatever happens

The RayJob starts a Ray cluster of training workers (`kubeflow.rayjob.worker` pods, one Ray Train
worker per accelerator): `compute.num_workers` for distill, `tune.max_concurrent` trials of
`tune.workers_per_trial` for tune. It runs `python -m kd_core.kubeflow.steps STEP` on that cluster
with the job and the input manifest URLs in its runtime environment, and is deleted (with its
cluster) when the step ends, fails or is cancelled. Checkpoints and Ray Tune's experiment live on
the job's storage, so a retried step resumes where the last RayJob stopped.

KubeRay's status: `jobDeploymentStatus` is `Complete` once the Ray job reached a terminal state
(`jobStatus` SUCCEEDED, FAILED or STOPPED) and `Failed` when the job could not be run at all
(submission failed, `activeDeadlineSeconds` passed, retries used up); anything else is still going.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from kd_core.config import ConfigError, JobConfig, PodResources, SecretEnv
from kd_core.kubeflow.isolation import POLICY_TEMPLATE_NAME, fence_rayjob, label_ray_pods
from kd_core.kubeflow.steps import INPUTS_ENV, JOB_ENV, job_json
from kd_core.progress import say

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
ENTRYPOINT = "python -m kd_core.kubeflow.steps {step}"
RAYJOB_STEPS = ("distill", "tune")
INFRA_DIR_ENV = "KDFLOW_INFRA_DIR"
"""Where infra/ lives in the image (set by infra/Dockerfile); a source checkout finds it beside kd_core."""


class RayJobFailed(RuntimeError):
    """The RayJob ended without its Ray job succeeding; the message carries KubeRay's reason."""


def template_path() -> Path:
    root = Path(os.environ.get(INFRA_DIR_ENV) or Path(__file__).resolve().parents[2] / "infra")
    return root / "kuberay" / "rayjob.yaml"


def load_template() -> dict[str, Any]:
    path = template_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the RayJob template is missing; set {INFRA_DIR_ENV} to the infra/ folder of kdflow")
    return yaml.safe_load(path.read_text())


def rayjob_name(step: str, inputs: dict[str, str]) -> str:
    """`kdflow-<step>-<what>-<attempt>`: the same inputs share a prefix, every attempt is unique."""
    what = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]
    return f"kdflow-{step}-{what}-{uuid.uuid4().hex[:5]}"


def build_rayjob(config: JobConfig, step: str, inputs: dict[str, str], name: str, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The RayJob manifest that runs `step` (distill or tune) of `config` on the input manifests `inputs`."""
    if step not in RAYJOB_STEPS:
        raise ValueError(f"step {step!r} does not run as a RayJob; one of {', '.join(RAYJOB_STEPS)}")
    settings, kubeflow = config.kubeflow.rayjob, config.kubeflow
    workers_per_pod = max(settings.worker.accelerators, 1)
    replicas = _worker_replicas(config, step, workers_per_pod)
    inner = config.model_copy(deep=True)
    inner.compute.ray_address = "auto"
    inner.compute.backend = "ray"
    inner.compute.use_gpu = settings.worker.accelerators > 0
    inner.kubeflow.rayjob.enabled = False  # inside the RayJob the step trains; it does not launch another
    job = copy.deepcopy(template if template is not None else load_template())
    job["metadata"]["name"] = name
    job["metadata"]["namespace"] = kubeflow.namespace
    labels = job["metadata"].setdefault("labels", {})
    labels["kdflow/job"], labels["app.kubernetes.io/component"] = _label(config.name), step
    spec = job["spec"]
    spec["entrypoint"] = ENTRYPOINT.format(step=step)
    spec["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": {JOB_ENV: job_json(inner), INPUTS_ENV: json.dumps(inputs, sort_keys=True)}})
    spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] = kubeflow.image
    cluster = spec["rayClusterSpec"]
    cluster["rayVersion"] = settings.ray_version
    _fill_pod(cluster["headGroupSpec"]["template"]["spec"], kubeflow.image, settings.head, kubeflow.secrets)
    (group,) = cluster["workerGroupSpecs"]
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = replicas
    _fill_pod(group["template"]["spec"], kubeflow.image, settings.worker, kubeflow.secrets)
    label_ray_pods(job)  # what its NetworkPolicy admits (kd_core/kubeflow/isolation.py)
    return job


def _worker_replicas(config: JobConfig, step: str, workers_per_pod: int) -> int:
    """Worker pods: distill's `compute.num_workers`, or room for `tune.max_concurrent` trials."""
    compute, tune, pod_cpu = config.compute, config.tune, config.kubeflow.rayjob.worker.cpu
    if step == "tune":
        workers = (tune.workers_per_trial or compute.num_workers) * tune.max_concurrent
        cpus, cpu_field = tune.cpus_per_worker or compute.cpus_per_worker, "tune.cpus_per_worker"
    else:
        workers, cpus, cpu_field = compute.num_workers, compute.cpus_per_worker, "compute.cpus_per_worker"
        if workers % workers_per_pod:
            raise ConfigError(
                f"compute.num_workers ({workers}) must be a multiple of kubeflow.rayjob.worker.accelerators ({workers_per_pod}): "
                "each worker pod runs one Ray Train worker per accelerator"
            )
    if pod_cpu is not None and cpus * workers_per_pod > cpu_count(pod_cpu):
        raise ConfigError(
            f"{cpu_field} ({cpus}) × {workers_per_pod} workers per pod exceeds kubeflow.rayjob.worker.cpu ({pod_cpu}); "
            "lower one or raise the other"
        )
    return math.ceil(workers / workers_per_pod)


def cpu_count(quantity: str) -> float:
    """A Kubernetes CPU quantity as cores: '500m' -> 0.5, '8' -> 8."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _fill_pod(pod: dict[str, Any], image: str, resources: PodResources, secrets: list[SecretEnv]) -> None:
    container = pod["containers"][0]
    container["image"] = image
    container["resources"] = pod_resources(resources)
    container["env"] = [*container.get("env", []), *secret_env(secrets)]
    pod["nodeSelector"] = dict(resources.node_selector)
    pod["tolerations"] = [t.model_dump(exclude_none=True) for t in resources.tolerations] or pod.get("tolerations", [])
    if not resources.accelerators:
        pod["tolerations"] = [t for t in pod["tolerations"] if t.get("key") != resources.accelerator_type]
    if not pod["nodeSelector"]:
        del pod["nodeSelector"]
    if not pod["tolerations"]:
        del pod["tolerations"]


def pod_resources(resources: PodResources) -> dict[str, dict[str, str]]:
    """Kubernetes requests/limits: a limit defaults to its request; accelerators go in both."""
    requests = {key: value for key, value in (("cpu", resources.cpu), ("memory", resources.memory)) if value}
    limits = {"cpu": resources.cpu_limit or resources.cpu, "memory": resources.memory_limit or resources.memory}
    limits = {key: value for key, value in limits.items() if value}
    if resources.accelerators:
        requests[resources.accelerator_type] = limits[resources.accelerator_type] = str(resources.accelerators)
    return {"requests": requests, "limits": limits}


def secret_env(secrets: list[SecretEnv]) -> list[dict[str, Any]]:
    """Environment variables read from Kubernetes secrets (the values never pass through kdflow)."""
    return [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": key}}}
        for secret in secrets
        for variable, key in secret.env.items()
    ]


def _label(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return cleaned or "job"


# ------------------------------------------------------------------------------------ watching
@dataclass(frozen=True)
class RayJobStatus:
    deployment: str
    job: str
    reason: str = ""
    message: str = ""

    @classmethod
    def of(cls, rayjob: dict[str, Any]) -> RayJobStatus:
        status = rayjob.get("status") or {}
        return cls(
            deployment=status.get("jobDeploymentStatus") or "New",
            job=status.get("jobStatus") or "PENDING",
            reason=status.get("reason") or "",
            message=status.get("message") or "",
        )

    @property
    def finished(self) -> bool:
        return self.deployment in ("Complete", "Failed")

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job == "SUCCEEDED"

    def describe(self, name: str) -> str:
        why = f" ({self.reason}: {self.message})" if self.reason or self.message else ""
        return f"RayJob {name}: {self.deployment}, Ray job {self.job}{why}"


class RayJobApi(Protocol):
    def create(self, namespace: str, body: dict[str, Any]) -> None: ...
    def get(self, namespace: str, name: str) -> dict[str, Any]: ...
    def delete(self, namespace: str, name: str) -> None: ...


class KubernetesRayJobApi:
    """RayJobs through the Kubernetes API (in-cluster service account, or the local kubeconfig)."""

    def __init__(self):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._objects = client.CustomObjectsApi()

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        """Create the RayJob, then its NetworkPolicy, owned by it (kd_core/kubeflow/isolation.py)."""
        created = self._objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        fence_rayjob(self._objects.api_client, created, template_path().with_name(POLICY_TEMPLATE_NAME))

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def delete(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground")
        except ApiException as err:
            if err.status != 404:
                raise


def watch_rayjob(
    api: RayJobApi, namespace: str, name: str, *, poll_seconds: float, report: Callable[[str], None] = say,
    sleep: Callable[[float], None] = time.sleep,
) -> RayJobStatus:
    """Poll until the RayJob finishes; report each status change. Returns the final status if the
    Ray job succeeded, raises `RayJobFailed` with KubeRay's reason and message otherwise."""
    last = None
    while True:
        status = RayJobStatus.of(api.get(namespace, name))
        if status != last:
            report(status.describe(name))
            last = status
        if status.finished:
            if status.succeeded:
                return status
            raise RayJobFailed(
                f"RayJob {namespace}/{name} ended {status.deployment} with Ray job {status.job}"
                f"{': ' + status.reason if status.reason else ''}{' — ' + status.message if status.message else ''}; "
                f"its logs: kubectl logs -n {namespace} job/{name}"
            )
        sleep(poll_seconds)


def run_rayjob(api: RayJobApi, rayjob: dict[str, Any], *, poll_seconds: float, report: Callable[[str], None] = say, sleep=time.sleep) -> RayJobStatus:
    """Create the RayJob, watch it to the end and delete it (and its Ray cluster) whatever happens,
    including a SIGTERM from Kubernetes when the pipeline run is cancelled."""
    namespace, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        api.create(namespace, rayjob)
        report(f"RayJob {namespace}/{name} created ({rayjob['spec']['rayClusterSpec']['workerGroupSpecs'][0]['replicas']} worker pods)")
        return watch_rayjob(api, namespace, name, poll_seconds=poll_seconds, report=report, sleep=sleep)
    finally:
        api.delete(namespace, name)
        report(f"RayJob {namespace}/{name} deleted")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_step_rayjob(config: JobConfig, step: str, inputs: dict[str, str], api: RayJobApi | None = None) -> RayJobStatus:
    rayjob = build_rayjob(config, step, inputs, rayjob_name(step, inputs))
    return run_rayjob(api or KubernetesRayJobApi(), rayjob, poll_seconds=config.kubeflow.rayjob.poll_seconds)


def _raise_on_sigterm(signum, frame):
    raise SystemExit(f"terminated (signal {signum}) while a RayJob was running")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
