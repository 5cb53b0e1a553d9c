"""The tune stage: a hyperparameter search over distillation settings on Ray Tune.

    tune(config, prep, targets, store) -> Manifest

Every trial is a short distillation of the student (Ray Train workers inside one Ray Tune trial)
from the prep stage's tokens and the cache stage's teacher targets (or the online teacher), which
all trials share and none recomputes. Each trial applies its values to the fields of
`tune.space`, trains `tune.max_steps` steps and reports `val_loss` every `tune.eval_every` steps:
the student's cross-entropy on validation rows, or for a multimodal reward student (`task:
reward`) its preference KL to the teacher on validation pairs, whose teacher rewards the cache
stage computed. Optuna's TPE proposes the values (at most
`tune.max_concurrent` trials at once) and ASHA stops trials that trail at a rung.

Outputs in the stage folder:
- `best_config.yaml`: the complete job with the best trial's values (and the full run's
  `distill.train.max_steps`): what `kdflow distill` and the tune → distill pipeline run next;
- `trials.json`: every trial's values, reports and status (finished, stopped early, error);
- `tune.png`: the learning curves, the final metric per trial, and parameter importance;
- `search/`: Ray Tune's experiment; a search that was killed resumes from it with
  `Tuner.restore`, keeping every finished trial.
Trials are MLflow runs, children of one parent run that gets the best values, the table and the plot.
"""

from __future__ import annotations

import json
import math
import os

import yaml

from kd_core.config import JobConfig, SearchDimension, public_dict, set_dotted, validate_config
from kd_core.manifest import Manifest, ManifestError
from kd_core.stage import StageRun
from kd_core.storage import Store

METRIC = "val_loss"
BEST_CONFIG_NAME = "best_config.yaml"
TRIALS_NAME = "trials.json"
PLOT_NAME = "tune.png"
PARENT_RUN_NAME = "mlflow_parent_run.json"


def tune(config: JobConfig, prep: Manifest, targets: Manifest, store: Store, *, force: bool = False) -> Manifest:
    """Run (or resume, or reuse) the search of `config.tune` on the prep and cache/teacher outputs."""
    if not config.tune.space:
        raise ValueError("tune.space is empty: list the fields to search, e.g. distill.loss.kd_weight: {kind: uniform, low: 0.2, high: 0.9}")
    section = {
        "tune": config.tune.model_dump(mode="json"),
        "distill": config.distill.model_dump(mode="json", include={"loss", "train", "deepspeed", "teacher_source"} | _task_objective(config)),
        "student": config.student.model_dump(mode="json"),
    }
    _check_validation_targets(config, targets)
    run = StageRun(store, "tune", section, inputs={"prep": prep, targets.stage: targets}, force=force)
    if run.reused:
        return run.reused
    from kd_core.tune.search import run_search

    with run.timed("search"):
        trials, parent_run_id = run_search(config, prep, targets, store, run.folder, fresh=force)
    finished = [trial for trial in trials if trial["val_loss"] is not None]
    if not finished:
        errors = [trial["error"].strip().splitlines()[-1] for trial in trials if trial["error"]]
        cause = f"; the first trial's error: {errors[0]}" if errors else ""
        raise RuntimeError(f"tune: none of the {len(trials)} trials reported {METRIC}{cause}; see the Ray logs (KDFLOW_RAY_LOGS=1)")
    best = min(finished, key=lambda trial: trial["val_loss"])
    run.write_bytes(BEST_CONFIG_NAME, best_config_yaml(job_with(config, best["params"]), best).encode())
    run.write_bytes(TRIALS_NAME, json.dumps(trials, indent=2).encode())
    from kd_core.tune.report import importance, tune_png

    importances = importance(trials, config.tune.space)
    run.write_bytes(PLOT_NAME, tune_png(trials, importances, config.tune, metric_label(config.task)))
    metrics = {
        "best_val_loss": best["val_loss"],
        **({} if config.task == "reward" else {"best_val_perplexity": math.exp(best["val_loss"])}),
        "trials": len(trials),
        "finished": sum(trial["status"] == "finished" for trial in trials),
        "stopped_early": sum(trial["status"] == "stopped early" for trial in trials),
        "errored": sum(trial["status"] == "error" for trial in trials),
    }
    details = {"best_trial": best["trial"], "best_params": best["params"], "importance": importances, "mlflow_parent_run_id": parent_run_id}
    from kd_core.tune.search import log_parent_run

    log_parent_run(config, parent_run_id, metrics, best["params"], run)
    return run.finish(metrics=metrics, details=details)


def _check_validation_targets(config: JobConfig, targets: Manifest) -> None:
    """A reward student validates against the teacher's rewards of the validation pairs, which the
    cache stage computes; caches made before it did lack them."""
    from kd_core.cache import cache_shards

    if config.task == "reward" and targets.stage == "cache" and not cache_shards(targets, "val"):
        raise ManifestError(
            f"{targets.folder}: this reward cache has no teacher rewards of the validation pairs, which every trial "
            "validates against (it was made before kdflow cached them); rerun that step: add --force cache to the command"
        )


def metric_label(task: str) -> str:
    """What `val_loss` measures for the task's students (see `TrainSpec.validate_every`)."""
    return "preference KL to the teacher (nats/pair)" if task == "reward" else "validation loss (nats/token)"


def _task_objective(config: JobConfig) -> set[str]:
    """The distill settings beyond the language-model ones that shape a trial: a reward task's objective."""
    return {"reward"} if config.task == "reward" else set()


def job_with(config: JobConfig, params: dict) -> JobConfig:
    """The job with a trial's values set (dotted field -> value), validated."""
    raw = public_dict(config)
    for dotted, value in params.items():
        set_dotted(raw, dotted, value)
    job = validate_config(raw, source="a tune trial's config")
    job.storage = config.storage  # keep credentials the public dict left out
    return job


def best_job(config: JobConfig, tune_manifest: Manifest) -> JobConfig:
    """`config` with the search's best values: what the steps after a search run. Everything the
    search did not vary (eval gates, registry, storage credentials) comes from `config`, not from
    the job that first ran the search (the tune step is reused across jobs that differ there)."""
    return job_with(config, tune_manifest.details["best_params"])


def best_config_yaml(job: JobConfig, best: dict) -> str:
    """The best job as a complete kdflow YAML file (secrets excluded; the search section kept)."""
    values = ", ".join(f"{name}={value!r}" for name, value in best["params"].items())
    header = (
        f"# kdflow tune: the best of the search (trial {best['trial']}, {METRIC} {best['val_loss']:.4f} "
        f"at step {best['steps']}).\n# Searched values: {values}\n# Run it with: kdflow run <this file>\n"
    )
    return header + yaml.safe_dump(public_dict(job), sort_keys=False)


def search_space(space: dict[str, SearchDimension]) -> dict:
    """`tune.space` as Ray Tune distributions (which OptunaSearch converts to Optuna's)."""
    from ray import tune as ray_tune

    def distribution(dimension: SearchDimension):
        if dimension.kind == "uniform":
            return ray_tune.uniform(dimension.low, dimension.high)
        if dimension.kind == "loguniform":
            return ray_tune.loguniform(dimension.low, dimension.high)
        if dimension.kind == "int":
            return ray_tune.randint(int(dimension.low), int(dimension.high) + 1)
        return ray_tune.choice(list(dimension.values))

    return {name: distribution(dimension) for name, dimension in space.items()}


def quiet() -> bool:
    return os.environ.get("KDFLOW_QUIET") == "1"
