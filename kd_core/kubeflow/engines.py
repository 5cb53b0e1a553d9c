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


PIPELINES = ("distill", "tune-distill")
"""`distill`: prep → cache → distill → eval → register. `tune-distill`: … cache → tune → distill with the best config → …"""


def pipeline_function(config: JobConfig, pipeline: str = "distill"):
    from pipelines.dags import build_distill_pipeline, build_tune_distill_pipeline

    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline {pipeline!r}: one of {', '.join(PIPELINES)}")
    if pipeline == "tune-distill" and not config.tune.space:
        raise ConfigError("tune.space is empty: the tune-distill pipeline needs fields to search")
    return build_tune_distill_pipeline(config) if pipeline == "tune-distill" else build_distill_pipeline(config)


def compile_pipeline(config: JobConfig, path: str | Path, pipeline: str = "distill") -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_function(config, pipeline), str(path))
    return path


def local_job(config: JobConfig) -> JobConfig:
    """The job as the kfp.local steps see it: Ray in-process for distill, a local storage root made
    absolute (every step is a subprocess, possibly elsewhere)."""
    job = config.model_copy(deep=True)
    job.kubeflow.rayjob.enabled = False
    if "://" not in job.storage.root or job.storage.root.startswith("file://"):
        job.storage.root = str(Path(job.storage.root.removeprefix("file://")).resolve())
    return job


def run_local(config: JobConfig, pipeline: str = "distill") -> dict[str, Manifest]:
    """Run the DAG through kfp.local, then collect the manifests of the steps it made (after a
    search, those of the best job)."""
    from kfp import local

    from kd_core.pipeline import register_step, run_pipeline, search_steps
    from kd_core.stage import reuse_only
    from kd_core.tune import best_job

    job = local_job(config)
    root = Path(job.kubeflow.local_pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    say(f"kfp.local: running the {job.name} DAG (outputs of KFP itself under {root})")
    pipeline_function(job, pipeline)()
    with reuse_only():
        searched = {}
        if pipeline == "tune-distill":
            searched = search_steps(job)
            job = best_job(job, searched["tune"])
        steps = run_pipeline(job, until="eval")
        if steps["eval"].metrics["gates_passed"]:
            steps["register"] = register_step(job, steps["eval"], steps["distill"])
    return {**searched, **steps}


def client_host(config: JobConfig) -> str:
    host = config.kubeflow.host or os.environ.get(HOST_ENV)
    if not host:
        raise ConfigError(f"kubeflow.host: set the KFP endpoint (or {HOST_ENV}), e.g. http://ml-pipeline-ui.kubeflow:80")
    return host


def client(config: JobConfig):
    import kfp

    return kfp.Client(host=client_host(config), namespace=config.kubeflow.namespace)


def submit(config: JobConfig, pipeline: str = "distill", kfp_client=None) -> str:
    """Submit one run of the DAG; returns its run id."""
    kfp_client = kfp_client or client(config)
    result = kfp_client.create_run_from_pipeline_func(
        pipeline_function(config, pipeline), arguments={}, run_name=f"{config.name}", experiment_name=config.kubeflow.experiment,
        namespace=config.kubeflow.namespace, enable_caching=False, service_account=config.kubeflow.service_account,
    )
    return result.run_id


def check_cron(cron: str) -> str:
    """KFP cron: six fields, seconds first (`0 0 3 * * *` is 03:00 every day)."""
    fields = cron.split()
    if len(fields) != 6 or not all(re.fullmatch(_CRON_FIELD, field) for field in fields):
        raise ConfigError(f"--cron {cron!r}: KFP needs six fields, seconds first, e.g. '0 0 3 * * *' for 03:00 daily")
    return " ".join(fields)


def schedule(config: JobConfig, cron: str, package_dir: str | Path, pipeline: str = "distill", kfp_client=None) -> str:
    """Create a recurring run: one at a time (max concurrency 1), no catch-up of missed runs.
    Returns the recurring run's id."""
    cron = check_cron(cron)
    kfp_client = kfp_client or client(config)
    package = compile_pipeline(config, Path(package_dir) / f"{config.name}.yaml", pipeline)
    experiment = kfp_client.create_experiment(config.kubeflow.experiment, namespace=config.kubeflow.namespace)
    recurring = kfp_client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=f"{config.name}-schedule", cron_expression=cron,
        max_concurrency=1, no_catchup=True, pipeline_package_path=str(package), enable_caching=False,
        service_account=config.kubeflow.service_account,
    )
    return recurring.recurring_run_id
