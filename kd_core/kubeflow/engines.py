"""Running the job as a Kubeflow Pipelines DAG: compiled, locally through `kfp.local`, or on a cluster.

    compile_pipeline(config, path)     the DAG as KFP YAML (what `make pipelines` commits)
    run_local(config)                  the same DAG through kfp.local (SubprocessRunner, this Python)
    submit(config) / schedule(...)     one run, or a recurring run, on a KFP endpoint

Locally, every component runs as a subprocess of this Python environment and the distill step
runs Ray in-process (`kubeflow.rayjob.enabled` is switched off): what `kdflow run` does, step for
step, through KFP's own executor, parameter passing and condition handling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kd_core.config import ConfigError, JobConfig
from kd_core.manifest import Manifest
from kd_core.progress import say

HOST_ENV = "KF_PIPELINES_ENDPOINT"
_CRON_FIELD = r"[0-9A-Za-z*/,?#LW-]+"


def distill_pipeline(config: JobConfig):
    from pipelines.distill_pipeline import build_distill_pipeline

    return build_distill_pipeline(config)


def compile_pipeline(config: JobConfig, path: str | Path) -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(distill_pipeline(config), str(path))
    return path


def local_job(config: JobConfig) -> JobConfig:
    """The job as the kfp.local steps see it: Ray in-process for distill, a local storage root made
    absolute (every step is a subprocess, possibly elsewhere)."""
    job = config.model_copy(deep=True)
    job.kubeflow.rayjob.enabled = False
    if "://" not in job.storage.root or job.storage.root.startswith("file://"):
        job.storage.root = str(Path(job.storage.root.removeprefix("file://")).resolve())
    return job


def run_local(config: JobConfig) -> dict[str, Manifest]:
    """Run the DAG through kfp.local, then collect the manifests of the steps it made."""
    from kfp import local

    from kd_core.pipeline import register_step, run_pipeline
    from kd_core.stage import reuse_only

    job = local_job(config)
    root = Path(job.kubeflow.local_pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    say(f"kfp.local: running the {job.name} DAG (outputs of KFP itself under {root})")
    distill_pipeline(job)()
    with reuse_only():
        steps = run_pipeline(job, until="eval")
        if steps["eval"].metrics["gates_passed"]:
            steps["register"] = register_step(job, steps["eval"], steps["distill"])
    return steps


def client_host(config: JobConfig) -> str:
    host = config.kubeflow.host or os.environ.get(HOST_ENV)
    if not host:
        raise ConfigError(f"kubeflow.host: set the KFP endpoint (or {HOST_ENV}), e.g. http://ml-pipeline-ui.kubeflow:80")
    return host


def client(config: JobConfig):
    import kfp

    return kfp.Client(host=client_host(config), namespace=config.kubeflow.namespace)


def submit(config: JobConfig, kfp_client=None) -> str:
    """Submit one run of the DAG; returns its run id."""
    kfp_client = kfp_client or client(config)
    result = kfp_client.create_run_from_pipeline_func(
        distill_pipeline(config), arguments={}, run_name=f"{config.name}", experiment_name=config.kubeflow.experiment,
        namespace=config.kubeflow.namespace, enable_caching=False, service_account=config.kubeflow.service_account,
    )
    return result.run_id


def check_cron(cron: str) -> str:
    """KFP cron: six fields, seconds first (`0 0 3 * * *` is 03:00 every day)."""
    fields = cron.split()
    if len(fields) != 6 or not all(re.fullmatch(_CRON_FIELD, field) for field in fields):
        raise ConfigError(f"--cron {cron!r}: KFP needs six fields, seconds first, e.g. '0 0 3 * * *' for 03:00 daily")
    return " ".join(fields)


def schedule(config: JobConfig, cron: str, package_dir: str | Path, kfp_client=None) -> str:
    """Create a recurring run: one at a time (max concurrency 1), no catch-up of missed runs.
    Returns the recurring run's id."""
    cron = check_cron(cron)
    kfp_client = kfp_client or client(config)
    package = compile_pipeline(config, Path(package_dir) / f"{config.name}.yaml")
    experiment = kfp_client.create_experiment(config.kubeflow.experiment, namespace=config.kubeflow.namespace)
    recurring = kfp_client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=f"{config.name}-schedule", cron_expression=cron,
        max_concurrency=1, no_catchup=True, pipeline_package_path=str(package), enable_caching=False,
        service_account=config.kubeflow.service_account,
    )
    return recurring.recurring_run_id
