"""Running the job as a Kubeflow Pipelines DAG: compiled, locally through `kfp.local`, or on a cluster.

    compile_pipeline(config, path)     the DAG as KFP YAML (what `make pipelines` commits)
    run_local(config)                  the same DAG through kfp.local (SubprocessRunner, this Python)
    submit(config) / schedule(...)     one run, or a recurring run, on a KFP endpoint

Locally, every component runs as a subprocess of this Python environment and the distill step
runs Ray in-process (`kubeflow.rayjob.enabled` is switched off); the steps join the one local Ray
this process starts (`shared_ray`): what `kdflow run` does, step for step, through KFP's own
executor, parameter passing and condition handling. A task that fails
raises `DagTaskFailed` with the task's own one-line cause (`run_dag`), and the executor's dump of
each task's input (the whole job JSON) is left out of the streamed logs (`ExecutorInputFilter`).

This module sits beside the DAGs (`pipelines.dags`) because it builds them, and the library's
modules never import `pipelines/` or `components/`: only the command line (`kd_core.cli`, an
entry point) imports it, for `kdflow compile|submit|schedule` and `kdflow run --engine kfp-local`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from kd_core.config import ConfigError
from kd_core.job import JobConfig
from kd_core.manifest import Manifest
from kd_core.progress import say, silenced

HOST_ENV = "KF_PIPELINES_ENDPOINT"
_CRON_FIELD = r"[0-9A-Za-z*/,?#LW-]+"


PIPELINES = ("distill", "tune-distill")
"""`distill`: prep → cache → distill → eval → register. `tune-distill`: … cache → tune → distill with the best config → …"""


_KFP_LOCAL_NOTICES = (r"Task '.*': settings .* have no effect in the current local runner", r"You may be attemping to run a task that uses custom")
"""kfp.local's warnings on every task of a kdflow DAG, all expected: resources do not apply
locally, and the kdflow image's code is this Python's on purpose (SubprocessRunner)."""


class DagTaskFailed(RuntimeError):
    """A kfp.local task failed: `step` (None if unknown), its one-line cause as the message, and
    whether the cause was bad input (the CLI exits 2 then, else 1)."""

    def __init__(self, step: str | None, cause: str, bad_input: bool):
        super().__init__(cause)
        self.step, self.bad_input = step, bad_input


def pipeline_function(config: JobConfig, pipeline: str = "distill"):
    from pipelines.dags import build_distill_pipeline, build_tune_distill_pipeline

    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline {pipeline!r}: one of {', '.join(PIPELINES)}")
    if pipeline == "tune-distill" and not config.tune.space:
        raise ConfigError("tune.space is empty: the tune-distill pipeline needs fields to search")
    return build_tune_distill_pipeline(config) if pipeline == "tune-distill" else build_distill_pipeline(config)


def compile_pipeline(config: JobConfig, path: str | Path, pipeline: str = "distill") -> Path:
    """Compile the DAG to `path`. Secrets in the config never go into it: the steps read them
    from `kubeflow.secrets` on the cluster (said when the config holds S3 credentials)."""
    from kfp import compiler

    s3 = config.storage.s3
    if s3.access_key_id is not None or s3.secret_access_key is not None:
        names = ", ".join(secret.secret for secret in config.kubeflow.secrets) or "none"
        say(f"[yellow]compile: storage.s3's credentials stay out of the pipeline; on the cluster the steps read "
            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from kubeflow.secrets ({names})[/yellow]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_function(config, pipeline), str(path))
    return path


def local_job(config: JobConfig) -> JobConfig:
    """The job as the kfp.local steps see it: Ray in-process for distill, no task retried (a local
    failure is a bug or bad input to show now, not a lost pod; kfp.local would wait out the
    backoff), a local storage root made absolute (every step is a subprocess, possibly elsewhere)."""
    job = config.model_copy(deep=True)
    job.kubeflow.rayjob.enabled = False
    job.kubeflow.retry.retries = 0
    if "://" not in job.storage.root or job.storage.root.startswith("file://"):
        job.storage.root = str(Path(job.storage.root.removeprefix("file://")).resolve())
    return job


def run_local(config: JobConfig, pipeline: str = "distill") -> dict[str, Manifest]:
    """Run the DAG through kfp.local, then collect the manifests of the steps it made (after a
    search, those of the best job). A manifest is marked `reused` when it is older than this run:
    its task found it by key instead of running the stage."""
    from kfp import local

    job = local_job(config)
    root = Path(job.kubeflow.local_pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    say(f"kfp.local: running the {job.name} DAG (outputs of KFP itself under {root})")
    started = datetime.now(timezone.utc).replace(microsecond=0)
    with shared_ray(job, pipeline):
        run_dag(pipeline_function(job, pipeline))
    steps = _collect_manifests(job, pipeline)
    for manifest in steps.values():
        manifest.reused = datetime.fromisoformat(manifest.created_at) < started
    return steps


@contextmanager
def shared_ray(job: JobConfig, pipeline: str) -> Iterator[None]:
    """The DAG's steps (each a subprocess) share one Ray: this process starts the local one and
    its steps join it through their environment (`ray_env`), instead of each starting its own.
    Needed when the steps run on Ray (`compute.backend: ray`) or search (a search always runs
    its trials in Ray Tune)."""
    if (job.compute.backend != "ray" and pipeline != "tune-distill") or job.compute.ray_address:
        yield
        return
    from kd_core.train.ray_glue import ensure_ray, ray_env

    ensure_ray(job.compute, warm=False)  # its worker processes would serve this process's job, not the steps'
    with _environment(ray_env()):
        yield


def _collect_manifests(job: JobConfig, pipeline: str) -> dict[str, Manifest]:
    from kd_core.pipeline import register_step, run_pipeline, search_steps
    from kd_core.stage import reuse_only
    from kd_core.tune import best_job

    with reuse_only(), silenced():
        searched = {}
        if pipeline == "tune-distill":
            searched = search_steps(job)
            job = best_job(job, searched["tune"])
        steps = run_pipeline(job, until="eval")
        if steps["eval"].metrics["gates_passed"]:
            steps["register"] = register_step(job, steps["eval"], steps["distill"])
    return {**searched, **steps}


def run_dag(dag: Callable[[], object]) -> None:
    """Run a kfp.local pipeline; a failed task raises `DagTaskFailed` with the task's own cause.

    kfp.local runs each task in a subprocess, streams its output into this process's stdout and
    reports a failure only as "Inner task failed: 'prep'", the cause some 35 lines up. So each
    component (`steps.run_step`) writes its cause as JSON into the folder named by
    `STEP_ERROR_DIR_ENV`, which this function sets for the subprocesses (they inherit the
    environment) and reads back. A file does not depend on the wording or layout of kfp's logs, as
    scraping a marker line from the streamed output would, nor on where KFP puts a task's outputs.
    A task that fails outside `run_step` leaves no file: kfp's own message is the cause then.
    """
    from kd_core.kubeflow.steps import STEP_ERROR_DIR_ENV

    with tempfile.TemporaryDirectory(prefix="kdflow-kfp-errors-") as folder, _environment({STEP_ERROR_DIR_ENV: folder}):
        with quiet_executor_input(), warnings.catch_warnings():
            for expected in _KFP_LOCAL_NOTICES:
                warnings.filterwarnings("ignore", message=expected)
            try:
                dag()
            except RuntimeError as err:
                raise _task_failure(Path(folder), err) from None


def _task_failure(folder: Path, kfp_error: RuntimeError) -> DagTaskFailed:
    """The first task's cause written to `folder`; kfp's own message when there is none."""
    records = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime)
    if not records:
        return DagTaskFailed(None, re.sub(r"\x1b\[[0-9;]*m", "", str(kfp_error)), bad_input=False)
    record = json.loads(records[0].read_text())
    return DagTaskFailed(record["step"], record["error"], bad_input=record["bad_input"])


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in this process's environment (which subprocesses inherit), then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ExecutorInputFilter:
    """This process's stdout while kfp.local streams task output into it, without the KFP
    executor's INFO lines: above all "Got executor_input:" and the JSON after it (the whole job,
    dozens of lines per task). The executor logs those at INFO on its root logger in the task's
    subprocess (`kfp/dsl/executor_main.py`, `logging.basicConfig(level=INFO)`) before any kdflow
    code runs, so the level cannot be lowered there; this drops those records where they arrive.
    Everything else passes unchanged: the executor's warnings and errors, the component's output
    and tracebacks, kfp.local's own lines. A block that does not look like the JSON dump is passed
    through rather than guessed at."""

    _EXECUTOR_INFO = re.compile(r"\[KFP Executor [^\]]* INFO\]: ")

    def __init__(self, target):
        self.target, self._pending = target, ""
        self._closing: str | None = None
        """While inside the dumped JSON: the line that closes it ("" until its first line)."""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if not self._drops(line):
                self.target.write(line + "\n")
        return len(text)

    def _drops(self, line: str) -> bool:
        if self._closing == "":
            if line.strip() != "{":
                self._closing = None
                return False
            self._closing = line.rstrip()[:-1] + "}"
            return True
        if self._closing is not None:
            if line.rstrip() == self._closing:
                self._closing = None
            return True
        if self._EXECUTOR_INFO.search(line):
            self._closing = "" if line.rstrip().endswith("Got executor_input:") else None
            return True
        return False

    def flush(self) -> None:
        self.target.flush()

    def close_pending(self) -> None:
        if self._pending:
            self.target.write(self._pending)
            self._pending = ""

    def __getattr__(self, name: str):
        return getattr(self.target, name)


@contextmanager
def quiet_executor_input() -> Iterator[None]:
    """`sys.stdout` is an `ExecutorInputFilter` in this block."""
    original = sys.stdout
    sys.stdout = quiet = ExecutorInputFilter(original)
    try:
        yield
    finally:
        quiet.close_pending()
        sys.stdout = original


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
