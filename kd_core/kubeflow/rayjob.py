"""The distill and tune steps on a cluster: a KubeRay RayJob, submitted (or adopted), watched and
cleaned up by the step's pod.

    build_rayjob(config, step, inputs, name)   the RayJob manifest, from infra/kuberay/rayjob.yaml
    watch_rayjob(api, namespace, name, ...)    poll its status, print every change, raise on failure
    run_rayjob(api, rayjob, ...)               adopt or create it, watch it, delete it when it is done
    run_step_rayjob(config, step, inputs)      all of it, for one step of a job

The RayJob starts a Ray cluster of training workers (`kubeflow.rayjob.worker` pods, one Ray Train
worker per accelerator): `compute.num_workers` for distill, `tune.max_concurrent` trials of
`tune.workers_per_trial` for tune. It runs `python -m kd_core.kubeflow.steps STEP` on that cluster
with the job and the input manifest URLs in its runtime environment. Checkpoints and Ray Tune's
experiment live on the job's storage, so a new RayJob for a step resumes where the last one stopped.

A distill job runs for days, and the step's pod must not lose it to a hiccup of the Kubernetes API:

- Every API call has a timeout and is retried through transient errors (no connection, a
  timeout, HTTP 408, 429, 5xx) with capped exponential backoff and jitter, waiting out a
  Retry-After, for up to `kubeflow.rayjob.api_retry_seconds` (`ApiRetry`). Other errors (403,
  404, 422, ...) fail the step at once, with what to check.
- The RayJob is deleted only when it has finished (succeeded or failed) or when the run is
  cancelled (SIGTERM from KFP, Ctrl-C; Kubernetes stops an evicted pod the same way, which is
  why the DAG marks these pods not safe to evict). A step that fails on the API, or on anything
  else, leaves it running and says how to look at it.
- Submission is idempotent: the RayJob is labelled with the step key (`kdflow/step-key`: the step,
  its input manifests and the job apart from its `kubeflow` section). A retried or rerun step first
  lists the RayJobs with its key and adopts one that is still going instead of starting a second
  one into the same checkpoint folder; a finished one is never adopted.
- On a cluster the step's pod knows itself through the downward API (`POD_ENV`, set by
  pipelines/dags.py), and the RayJob gets an ownerReference to it (an adopting pod adds itself),
  so deleting the run's pods garbage-collects the RayJob. Outside a pod there is none.

KubeRay's status: `jobDeploymentStatus` is `Complete` once the Ray job reached a terminal state
(`jobStatus` SUCCEEDED, FAILED or STOPPED), `Failed` when the job could not be run at all
(submission failed, `activeDeadlineSeconds` passed, retries used up) and `ValidationFailed` when
KubeRay rejected the spec; anything else is still going.
"""

from __future__ import annotations

import copy
import email.utils
import json
import math
import os
import random
import re
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from kd_core.config import ConfigError, PodResources, RayJobConfig, SecretEnv, public_dict, section_hash
from kd_core.job import JobConfig
from kd_core.kubeflow.isolation import POLICY_TEMPLATE_NAME, fence_rayjob, label_ray_pods
from kd_core.kubeflow.job import INPUTS_ENV, JOB_ENV, job_json
from kd_core.progress import say

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
ENTRYPOINT = "python -m kd_core.kubeflow.steps {step}"
RAYJOB_STEPS = ("distill", "tune")
INFRA_DIR_ENV = "KDFLOW_INFRA_DIR"
"""Where infra/ lives in the image (set by infra/Dockerfile); a source checkout finds it beside kd_core."""
STEP_KEY_LABEL = "kdflow/step-key"
"""The label that finds the RayJob of a step key (`step_key`)."""
POD_ENV = {"KDFLOW_POD_NAME": "metadata.name", "KDFLOW_POD_UID": "metadata.uid", "KDFLOW_POD_NAMESPACE": "metadata.namespace"}
"""Environment variable -> the field of the step's own pod it holds (the downward API; pipelines/dags.py sets them)."""
CANCEL_DELETE_SECONDS = 20.0
"""How long a cancelled step retries deleting its RayJob: within Kubernetes' default 30 s grace period."""


def template_path() -> Path:
    root = Path(os.environ.get(INFRA_DIR_ENV) or Path(__file__).resolve().parents[2] / "infra")
    return root / "kuberay" / "rayjob.yaml"


def load_template() -> dict[str, Any]:
    path = template_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the RayJob template is missing; set {INFRA_DIR_ENV} to the infra/ folder of kdflow")
    return yaml.safe_load(path.read_text())


def step_key(config: JobConfig, step: str, inputs: dict[str, str]) -> str:
    """What a RayJob computes, as a label value: a hash of the step, its input manifest URLs and the
    job apart from its `kubeflow` section (how the job runs on Kubernetes, which changes nothing a
    stage computes). The same key means the same work into the same checkpoint folder."""
    job = public_dict(config)
    del job["kubeflow"]
    return section_hash({"step": step, "inputs": inputs, "job": job})[:20]


def rayjob_name(step: str, key: str) -> str:
    """`kdflow-<step>-<key>-<attempt>`: one step key shares a prefix, every new RayJob is unique."""
    return f"kdflow-{step}-{key[:8]}-{uuid.uuid4().hex[:5]}"


def build_rayjob(
    config: JobConfig, step: str, inputs: dict[str, str], name: str, template: dict[str, Any] | None = None,
    owner: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The RayJob manifest that runs `step` (distill or tune) of `config` on the input manifests
    `inputs`, labelled with its step key; `owner` (`step_pod_owner`): the pod it belongs to."""
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
    labels[STEP_KEY_LABEL] = step_key(config, step, inputs)
    if owner is not None:
        job["metadata"]["ownerReferences"] = [owner]
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


def step_pod_owner(namespace: str, environ: Mapping[str, str] = os.environ, report: Callable[[str], None] = say) -> dict[str, str] | None:
    """The ownerReference to the step's own pod, read from the downward API (`POD_ENV`); None
    outside a pod, or when the pod is in another namespace than the RayJob (Kubernetes would treat
    that owner as missing and garbage-collect the RayJob at once)."""
    name, uid, pod_namespace = (environ.get(variable) for variable in POD_ENV)
    if not (name and uid and pod_namespace):
        return None
    if pod_namespace != namespace:
        report(f"the step's pod is in namespace {pod_namespace}, the RayJob in {namespace}: the RayJob gets no owner and outlives the pod")
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


# ------------------------------------------------------------------------------------ the API
class RayJobFailed(RuntimeError):
    """The RayJob ended without its Ray job succeeding; the message carries KubeRay's reason."""


class KubernetesApiFailed(RuntimeError):
    """A Kubernetes API call the step could not make; the message names the call and what to do.
    `status`: the last HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class KubernetesApiUnavailable(KubernetesApiFailed):
    """The API kept failing transiently for longer than `kubeflow.rayjob.api_retry_seconds`."""


class KubernetesApiRefused(KubernetesApiFailed):
    """The API answered with an error that a retry does not mend (403, 404, 422, ...)."""


class RayJobApi(Protocol):
    """The RayJob endpoints of the Kubernetes API; errors are raised as the kubernetes client raises them."""

    def list(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...
    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def fence(self, namespace: str, rayjob: dict[str, Any]) -> None: ...
    def get(self, namespace: str, name: str) -> dict[str, Any]: ...
    def set_owners(self, namespace: str, name: str, owners: list[dict[str, str]]) -> None: ...
    def delete(self, namespace: str, name: str) -> None: ...


class KubernetesRayJobApi:
    """RayJobs through the Kubernetes API: the in-cluster service account or the local kubeconfig,
    or `configuration` (a `kubernetes.client.Configuration`) when given.

    urllib3's own retries are off (by default it retries a dropped connection, and a 429 or 503
    with Retry-After, three times, sleeping inside the call): `ApiRetry` is the one retry loop, so
    its budget counts every wait and each retry is reported. Every request has a timeout
    (`REQUEST_TIMEOUT`; the client sets none): an API server that stops answering is a transient
    error, not a watcher that hangs."""

    REQUEST_TIMEOUT = (10.0, 60.0)
    """Seconds to connect, and to wait for the answer."""

    def __init__(self, configuration=None):
        from kubernetes import client, config

        if configuration is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            configuration = client.Configuration.get_default_copy()
        configuration.retries = False
        self._objects = client.CustomObjectsApi(client.ApiClient(configuration))

    def list(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = self._objects.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=label_selector, _request_timeout=self.REQUEST_TIMEOUT
        )
        return found.get("items", [])

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, _request_timeout=self.REQUEST_TIMEOUT)

    def fence(self, namespace: str, rayjob: dict[str, Any]) -> None:
        """The RayJob's NetworkPolicy, owned by it (kd_core/kubeflow/isolation.py); kept if it exists."""
        fence_rayjob(self._objects.api_client, rayjob, template_path().with_name(POLICY_TEMPLATE_NAME))

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.REQUEST_TIMEOUT)

    def set_owners(self, namespace: str, name: str, owners: list[dict[str, str]]) -> None:
        """Replace the ownerReferences (a JSON merge patch replaces a list whole)."""
        patch = {"metadata": {"ownerReferences": owners}}
        self._objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch, _request_timeout=self.REQUEST_TIMEOUT)

    def delete(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._objects.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground", _request_timeout=self.REQUEST_TIMEOUT
            )
        except ApiException as err:
            if err.status != 404:
                raise


@dataclass(frozen=True)
class ApiError:
    """What a failed API call raised, as the retry loop sees it. `status`: the HTTP status (0: no
    answer); `retry_after`: the seconds the server asked to wait, if it did."""

    transient: bool
    status: int
    description: str
    retry_after: float | None = None

    @classmethod
    def of(cls, err: Exception) -> ApiError | None:
        """None for an exception that is not about reaching the API (a bug: it is raised as it is)."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        if isinstance(err, ApiException):
            # 0: the client got no HTTP answer (it raises its TLS errors so); 408 and 429: come back later.
            status = int(err.status or 0)
            transient = status in (0, 408, 429) or status >= 500
            return cls(transient, status, _describe_api_exception(err), _retry_after(err.headers) if transient else None)
        if isinstance(err, (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError)):
            return cls(True, 0, _first_line(f"{type(err).__name__}: {err}"))
        return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _describe_api_exception(err) -> str:
    """`403 Forbidden: <the Status message>`: the body's message, not the whole response."""
    described = _first_line(f"{err.status} {err.reason or ''}")
    try:
        message = json.loads(err.body).get("message") if err.body else None
    except (ValueError, AttributeError):
        message = None
    return f"{described}: {message}" if message else described


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = next((v for k, v in (headers or {}).items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


_HINTS = {
    401: "the step's credentials were not accepted by the API server",
    403: "the step's service account (kubeflow.service_account) lacks this permission: see infra/k8s/rbac.yaml",
    404: "no such RayJob, or no RayJob resource at all: is the KubeRay operator installed?",
    409: "a RayJob of that name exists already",
    422: "the API server rejected the RayJob manifest: check kubeflow.rayjob and infra/kuberay/rayjob.yaml",
}

Result = TypeVar("Result")


@dataclass(frozen=True)
class ApiRetry:
    """How long and how patiently a Kubernetes API call is retried through transient errors.

    The wait before retry n (from 0) is `first_backoff × 2ⁿ`, capped at `max_backoff`, jittered to
    between half and all of it (so that many pods do not retry in step), and never shorter than a
    Retry-After the server sent. The call gives up when the next wait would end more than
    `budget_seconds` after its first try."""

    budget_seconds: float
    first_backoff: float
    max_backoff: float

    @classmethod
    def of(cls, settings: RayJobConfig) -> ApiRetry:
        return cls(settings.api_retry_seconds, settings.api_backoff_seconds, settings.api_backoff_max_seconds)

    def backoff(self, retry: int) -> float:
        return min(self.first_backoff * 2.0 ** min(retry, 40), self.max_backoff) * random.uniform(0.5, 1.0)

    def call(
        self, what: str, request: Callable[[], Result], *, report: Callable[[str], None], sleep: Callable[[float], None],
        clock: Callable[[], float],
    ) -> Result:
        """`request()`, retried through transient errors; raises `KubernetesApiUnavailable` when the
        budget is spent, `KubernetesApiRefused` at once on any other API error."""
        started, retry = clock(), 0
        while True:
            try:
                return request()
            except Exception as err:
                error = ApiError.of(err)
                if error is None:
                    raise
                if not error.transient:
                    raise KubernetesApiRefused(f"{what}: {error.description} ({_HINTS.get(error.status, 'not retried')})", error.status) from err
                wait = max(self.backoff(retry), error.retry_after or 0.0)
                spent = clock() - started
                if spent + wait > self.budget_seconds:
                    raise KubernetesApiUnavailable(
                        f"{what}: the Kubernetes API still fails after {retry + 1} tries over {spent:.0f} s "
                        f"(kubeflow.rayjob.api_retry_seconds = {self.budget_seconds:g}); last error: {error.description}",
                        error.status,
                    ) from err
                report(f"{what}: {error.description}; retry {retry + 1} in {wait:.1f} s")
                sleep(wait)
                retry += 1


DEFAULT_RETRY = ApiRetry.of(RayJobConfig())


class PatientRayJobApi:
    """`RayJobApi` with every call made through `ApiRetry.call`, each named for its messages."""

    def __init__(
        self, api: RayJobApi, retry: ApiRetry, *, report: Callable[[str], None] = say, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.api, self.retry, self.report, self.sleep, self.clock = api, retry, report, sleep, clock

    def _call(self, what: str, request: Callable[[], Result], retry: ApiRetry | None = None) -> Result:
        return (retry or self.retry).call(what, request, report=self.report, sleep=self.sleep, clock=self.clock)

    def list(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        return self._call(f"list RayJobs {namespace}/{label_selector}", lambda: self.api.list(namespace, label_selector))

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create and return the RayJob as stored; a 409 after a transient failure means the failed
        try did create it (the name is unique to this attempt): it is read back."""
        name, tried = body["metadata"]["name"], []

        def create_once() -> dict[str, Any] | None:
            tried.append(True)
            try:
                return self.api.create(namespace, body)
            except Exception as err:
                if len(tried) > 1 and getattr(err, "status", None) == 409:
                    return None
                raise

        created = self._call(f"create RayJob {namespace}/{name}", create_once)
        return created if created is not None else self.get(namespace, name)

    def fence(self, namespace: str, rayjob: dict[str, Any]) -> None:
        name = rayjob["metadata"]["name"]
        self._call(f"create the NetworkPolicy of RayJob {namespace}/{name}", lambda: self.api.fence(namespace, rayjob))

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(f"get RayJob {namespace}/{name}", lambda: self.api.get(namespace, name))

    def set_owners(self, namespace: str, name: str, owners: list[dict[str, str]]) -> None:
        self._call(f"set the owners of RayJob {namespace}/{name}", lambda: self.api.set_owners(namespace, name, owners))

    def delete(self, namespace: str, name: str, within: float | None = None) -> None:
        retry = ApiRetry(within, self.retry.first_backoff, self.retry.max_backoff) if within is not None else None
        self._call(f"delete RayJob {namespace}/{name}", lambda: self.api.delete(namespace, name), retry)


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
        return self.deployment in ("Complete", "Failed", "ValidationFailed")

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job == "SUCCEEDED"

    def describe(self, name: str) -> str:
        why = f" ({self.reason}: {self.message})" if self.reason or self.message else ""
        return f"RayJob {name}: {self.deployment}, Ray job {self.job}{why}"


def watch_rayjob(
    api: RayJobApi, namespace: str, name: str, *, poll_seconds: float, report: Callable[[str], None] = say,
    sleep: Callable[[float], None] = time.sleep, retry: ApiRetry = DEFAULT_RETRY, clock: Callable[[], float] = time.monotonic,
) -> RayJobStatus:
    """Poll until the RayJob finishes; report each status change. Returns the final status if the
    Ray job succeeded, raises `RayJobFailed` with KubeRay's reason and message otherwise. API errors
    are retried (`retry`); see `ApiRetry.call` for what it raises when they last."""
    patient = api if isinstance(api, PatientRayJobApi) else PatientRayJobApi(api, retry, report=report, sleep=sleep, clock=clock)
    last = None
    while True:
        status = RayJobStatus.of(patient.get(namespace, name))
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


# ------------------------------------------------------------------------------------ one step
class StepCancelled(SystemExit):
    """The step's pod got SIGTERM: KFP cancelled the run (or Kubernetes is stopping the pod)."""


def run_rayjob(
    api: RayJobApi, rayjob: dict[str, Any], *, poll_seconds: float, report: Callable[[str], None] = say,
    sleep: Callable[[float], None] = time.sleep, retry: ApiRetry = DEFAULT_RETRY, clock: Callable[[], float] = time.monotonic,
) -> RayJobStatus:
    """Adopt the RayJob still going for this step key, or create `rayjob`; watch it to the end.

    Deleted (with its Ray cluster) when it finished, succeeded or failed, and when the run is
    cancelled (SIGTERM, Ctrl-C). Any other failure, above all a Kubernetes API that does not
    answer for `retry.budget_seconds`, leaves it running and says so: a rerun of the step adopts it."""
    patient = PatientRayJobApi(api, retry, report=report, sleep=sleep, clock=clock)
    namespace, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    exists = False
    try:
        name = _adopt_or_create(patient, rayjob, report)
        exists = True
        status = watch_rayjob(patient, namespace, name, poll_seconds=poll_seconds, report=report, sleep=sleep)
    except (StepCancelled, KeyboardInterrupt):
        if exists:
            _delete(patient, namespace, name, report, within=min(CANCEL_DELETE_SECONDS, retry.budget_seconds))
        raise
    except RayJobFailed:
        _delete(patient, namespace, name, report)
        raise
    except KubernetesApiFailed as err:
        raise type(err)(_left_running(err, namespace, name, rayjob, exists), err.status) from err
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _delete(patient, namespace, name, report)
    return status


def _adopt_or_create(api: PatientRayJobApi, rayjob: dict[str, Any], report: Callable[[str], None]) -> str:
    """The name of the RayJob to watch: one still going with this step key, else `rayjob`, created."""
    metadata = rayjob["metadata"]
    namespace, key = metadata["namespace"], metadata["labels"][STEP_KEY_LABEL]
    going = [job for job in api.list(namespace, f"{STEP_KEY_LABEL}={key}") if not RayJobStatus.of(job).finished]
    if not going:
        api.fence(namespace, api.create(namespace, rayjob))
        replicas = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
        report(f"RayJob {namespace}/{metadata['name']} created ({replicas} worker pods, {STEP_KEY_LABEL}={key})")
        return metadata["name"]
    adopted = max(going, key=lambda job: job["metadata"].get("creationTimestamp") or "")
    name = adopted["metadata"]["name"]
    report(f"RayJob {namespace}/{name} adopted: it is still running this step ({STEP_KEY_LABEL}={key})")
    api.fence(namespace, adopted)  # its first step may have died between creating it and its NetworkPolicy
    owners = adopted["metadata"].get("ownerReferences") or []
    mine = [owner for owner in metadata.get("ownerReferences", []) if owner["uid"] not in {known["uid"] for known in owners}]
    if mine:
        try:
            api.set_owners(namespace, name, owners + mine)
        except KubernetesApiFailed as err:
            report(f"{err}; the RayJob keeps only its earlier owners and is deleted with their pods")
    return name


def _delete(api: PatientRayJobApi, namespace: str, name: str, report: Callable[[str], None], within: float | None = None) -> None:
    """Delete the RayJob; when the API does not let us, say so instead of hiding the step's own outcome."""
    try:
        api.delete(namespace, name, within)
    except KubernetesApiFailed as err:
        report(f"{err}; the RayJob was not deleted: kubectl delete rayjob -n {namespace} {name}")
        return
    report(f"RayJob {namespace}/{name} deleted")


def _left_running(err: KubernetesApiFailed, namespace: str, name: str, rayjob: dict[str, Any], exists: bool) -> str:
    if exists and isinstance(err, KubernetesApiRefused) and err.status == 404:
        return f"{err}; the RayJob is gone (deleted, or garbage-collected with the pods that owned it): rerun the step"
    key = rayjob["metadata"]["labels"][STEP_KEY_LABEL]
    if not exists:
        if isinstance(err, KubernetesApiRefused):
            return str(err)
        return f"{err}; if a RayJob was created after all, a rerun of this step adopts it (kubectl get rayjobs -n {namespace} -l {STEP_KEY_LABEL}={key})"
    return (
        f"{err}; RayJob {namespace}/{name} is left running: see it with `kubectl get rayjob -n {namespace} {name}`, "
        f"and a rerun of this step adopts it ({STEP_KEY_LABEL}={key})"
    )


def run_step_rayjob(config: JobConfig, step: str, inputs: dict[str, str], api: RayJobApi | None = None) -> RayJobStatus:
    settings, namespace = config.kubeflow.rayjob, config.kubeflow.namespace
    rayjob = build_rayjob(config, step, inputs, rayjob_name(step, step_key(config, step, inputs)), owner=step_pod_owner(namespace))
    return run_rayjob(api or KubernetesRayJobApi(), rayjob, poll_seconds=settings.poll_seconds, retry=ApiRetry.of(settings))


def _raise_on_sigterm(signum, frame):
    raise StepCancelled(f"terminated (signal {signum}) while a RayJob was running")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
