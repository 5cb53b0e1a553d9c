"""What each Kubeflow component runs: one stage of the job, its inputs named by manifest URL.

A component gets the job config as JSON (no secrets: those reach the pod as environment
variables from Kubernetes secrets) and the manifest URLs of the steps it reads. It runs its
stage through the same functions as `kdflow run` (`kd_core.pipeline`) and returns the URLs of
the manifests it made, so steps reuse finished work exactly as `kdflow run` does. The job's JSON
form and the RayJob's environment variables are in `kubeflow.job`.

On a cluster the distill step's pod submits a KubeRay RayJob (`kubeflow.rayjob`) whose
entrypoint is this module (`python -m kd_core.kubeflow.steps distill`, the job and inputs in its
environment), then collects the manifests under `reuse_only`: a RayJob that did not finish is an
error, never a silent retrain inside the step's small pod.

When `KDFLOW_STEP_ERROR_DIR` is set (kfp.local runs: `pipelines.engines.run_dag` sets it and reads it
back), a failing step writes its one-line cause there; bad input then ends the task with that line
and exit status 2, any other error raises as everywhere else (`reporting_failure`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kd_core.config import ConfigError
from kd_core.job import JobConfig
from kd_core.errors import InputError
from kd_core.kubeflow.job import INPUTS_ENV, JOB_ENV, job_config, job_json
from kd_core.manifest import Manifest, manifest_url, read_manifest_url
from kd_core.pipeline import cache_steps, distill_steps, eval_step, prep_step, register_step, tune_step
from kd_core.redaction import redact
from kd_core.stage import STAGE_CODE_VERSIONS, reuse_only
from kd_core.storage import Store
from kd_core.train.tracking_probe import fail_fast_mlflow_client

STEP_INPUTS = {
    "prep": (),
    "cache": ("prep",),
    "distill": ("prep", "teacher", "cache"),
    "tune": ("prep", "teacher", "cache"),
    "eval": ("prep", "teacher", "distill", "baseline"),
    "register": ("eval", "distill"),
}
"""Component -> the manifest URLs it takes (an empty URL: that step did not run, e.g. no baseline)."""
STEP_ERROR_DIR_ENV = "KDFLOW_STEP_ERROR_DIR"
"""A folder where a failing step writes `<step>.json`: {"step", "error" (one line), "bad_input"}.
kfp.local sets nothing like it; `pipelines.engines.run_local` does, for its task subprocesses."""


def run_step(step: str, job: str, inputs: dict[str, str]) -> dict[str, str]:
    """Run one component's stage; returns step name -> manifest URL of every step it made."""
    fail_fast_mlflow_client()
    with reporting_failure(step):
        return _run_checked(step, job, inputs)


@contextmanager
def reporting_failure(step: str) -> Iterator[None]:
    """Re-raise any error of the block, first writing its cause to `STEP_ERROR_DIR_ENV` if set.
    There, bad input ends the task with its one line and exit status 2 instead of a traceback: the
    caller reports it, and a traceback through kdflow's internals says nothing more about a data
    pattern that matches no file."""
    try:
        yield
    except Exception as err:
        folder = os.environ.get(STEP_ERROR_DIR_ENV)
        if not folder:
            raise
        bad_input = isinstance(err, (InputError, ConfigError))
        record = {"step": step, "error": one_line_cause(err), "bad_input": bad_input}
        Path(folder, f"{step}.json").write_text(json.dumps(record))
        if not bad_input:
            raise
        print(f"error: {record['error']}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line_cause(err: BaseException) -> str:
    """Bad input's message on one line (it names the field or file); else the error's type and
    first line."""
    if isinstance(err, (InputError, ConfigError)):
        return " ".join(str(err).split())  # already redacted when raised
    lines = redact(str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _run_checked(step: str, job: str, inputs: dict[str, str]) -> dict[str, str]:
    if step not in STEP_INPUTS:
        raise ValueError(f"unknown pipeline step {step!r}; one of {', '.join(STEP_INPUTS)}")
    missing = [name for name in STEP_INPUTS[step] if name not in inputs]
    if missing:
        raise ValueError(f"pipeline step {step} needs the manifest URLs of {', '.join(missing)}")
    config = job_config(job)
    store = Store(config.storage)
    given = {name: read_manifest_url(store, url, STAGE_CODE_VERSIONS) for name, url in inputs.items() if url}
    made = _run(step, config, given, inputs)
    return {name: manifest_url(store, manifest) for name, manifest in made.items()}


def _run(step: str, config: JobConfig, given: dict[str, Manifest], urls: dict[str, str]) -> dict[str, Manifest]:
    if step == "prep":
        return {"prep": prep_step(config)}
    if step == "cache":
        return cache_steps(config, given["prep"])
    if step in ("distill", "tune"):
        def run_here() -> dict[str, Manifest]:
            if step == "tune":
                return {"tune": tune_step(config, given["prep"], given["teacher"], given.get("cache"))}
            return distill_steps(config, given["prep"], given["teacher"], given.get("cache"))

        if config.kubeflow.rayjob.enabled:
            from kd_core.kubeflow.rayjob import run_step_rayjob

            run_step_rayjob(config, step, urls)
            with reuse_only():
                return run_here()
        return run_here()
    if step == "eval":
        return {"eval": eval_step(config, given["prep"], given["teacher"], given["distill"], given.get("baseline"))}
    return {"register": register_step(config, given["eval"], given["distill"])}


def eval_metrics(job: str, eval_url: str) -> tuple[bool, dict[str, float], str]:
    """For the eval component's typed outputs: (gates passed, scalar metrics, report HTML)."""
    config = job_config(job)
    store = Store(config.storage)
    manifest = read_manifest_url(store, eval_url, STAGE_CODE_VERSIONS)
    scalars = {"gates_passed": float(manifest.metrics["gates_passed"])}
    for model in ("teacher", "student", "baseline"):
        for name, value in manifest.metrics.get(model, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{model}.{name}"] = float(value)
    report = store.read_bytes(manifest.output("report.html").path).decode()
    return bool(manifest.metrics["gates_passed"]), scalars, report


def tune_outputs(job: str, tune_url: str) -> tuple[str, dict[str, float], str]:
    """For the tune component's outputs: (the best job as the `job` parameter of the steps after
    it, scalar metrics, an HTML page with the trials table and the plot)."""
    import base64

    from kd_core.tune import PLOT_NAME, TRIALS_NAME, best_job, ranked_trials, validation_names

    config = job_config(job)
    store = Store(config.storage)
    manifest = read_manifest_url(store, tune_url, STAGE_CODE_VERSIONS)
    best = best_job(config, manifest)
    scalars = {name: float(value) for name, value in manifest.metrics.items() if isinstance(value, (int, float))}
    trials = json.loads(store.read_bytes(manifest.output(TRIALS_NAME).path))
    metric, mode = manifest.details["metric"], manifest.details["mode"]  # what the search chose its best by
    names = validation_names(trials)
    rows = "".join(_trial_row(trial, names) for trial in ranked_trials(trials, metric, mode))
    head = "".join(f"<th>{name}</th>" for name in ("trial", "values", *names, "steps", "status"))
    plot = base64.b64encode(store.read_bytes(manifest.output(PLOT_NAME).path)).decode()
    page = (
        f"<html><body><h2>kdflow tune: {len(trials)} trials, ranked by {metric}</h2>"
        f"<img style='max-width:100%' src='data:image/png;base64,{plot}'>"
        f"<table border=1 cellpadding=4><tr>{head}</tr>{rows}</table></body></html>"
    )
    return job_json(best), scalars, page


def _trial_row(trial: dict, names: list[str]) -> str:
    import html

    scores = ["" if trial["metrics"].get(name) is None else f"{trial['metrics'][name]:.4g}" for name in names]
    cells = (trial["trial"], json.dumps(trial["params"]), *scores, trial["steps"], trial["status"])
    return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"


def main(argv: list[str] | None = None) -> int:
    """The RayJob entrypoint: `python -m kd_core.kubeflow.steps STEP`, job and inputs from the environment."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or JOB_ENV not in os.environ:
        print(f"usage: {JOB_ENV}=<job JSON> {INPUTS_ENV}=<inputs JSON> python -m kd_core.kubeflow.steps STEP", file=sys.stderr)
        return 2
    made = run_step(args[0], os.environ[JOB_ENV], json.loads(os.environ.get(INPUTS_ENV, "{}")))
    print(json.dumps(made, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
