"""Hyperparameter search over distillation settings on Ray Tune (the tune stage,
`kd_core/stages/tune.py`, runs it).

Every trial is a short distillation of the student (Ray Train workers inside one Ray Tune trial)
from the prep stage's tokens and the cache stage's teacher targets (or the online teacher), which
all trials share and none recomputes. Each trial applies its values to the fields of
`tune.space`, trains `tune.max_steps` steps and reports its validation metrics every
`tune.eval_every` steps: what the job's task validates a student on (`Task.validation_metrics`:
`val_loss`, a language model's cross-entropy on validation rows or a reward student's preference
KL to the teacher on validation pairs, whose teacher rewards the cache stage computed; a reward
student's `val_agreement` with the teacher's preferences too). Optuna's TPE proposes the values
(at most `tune.max_concurrent` trials at once) and ASHA stops trials that trail at a rung, both
on `tune.metric`, in the direction the task gives it (`Task.validation_modes`); the best trial is
the best on it.

Outputs in the stage folder:
- `best_config.yaml`: the complete job with the best trial's values (and the full run's
  `distill.train.max_steps`): what `kdflow distill` and the tune → distill pipeline run next;
- `trials.json`: every trial's values, reports of every validation metric, final values and status
  (finished, stopped early, error);
- `tune.png`: the learning curves, the final metric per trial, and parameter importance;
- `search/`: Ray Tune's experiment; a search that was killed resumes from it with
  `Tuner.restore`, keeping every finished trial.
Trials are MLflow runs, children of one parent run that gets the best values, the table and the plot.
"""

from __future__ import annotations

import os

import yaml

from kd_core.config import SearchDimension, public_dict
from kd_core.job import JobConfig, set_dotted, validate_config
from kd_core.manifest import Manifest

METRIC = "val_loss"
"""The validation metric every task reports (`Task.validation_metrics`); `tune.metric`'s default."""
BEST_CONFIG_NAME = "best_config.yaml"
TRIALS_NAME = "trials.json"
PLOT_NAME = "tune.png"
PARENT_RUN_NAME = "mlflow_parent_run.json"


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


def metric_mode(config: JobConfig) -> tuple[str, str]:
    """(`tune.metric`, its direction: `min` or `max`, as the job's task declares it)."""
    from kd_core.tasks import task_named

    return config.tune.metric, task_named(config.task).validation_modes[config.tune.metric]


def trial_value(trial: dict, metric: str) -> float | None:
    """A trial's final value of a validation metric (None: it never reported it)."""
    return trial["metrics"].get(metric)


def ranked_trials(trials: list[dict], metric: str, mode: str) -> list[dict]:
    """The trials best first on `metric` (`mode`: `min` or `max`); those without a value last."""
    sign = 1.0 if mode == "min" else -1.0

    def key(trial: dict) -> tuple[bool, float]:
        value = trial_value(trial, metric)
        return value is None, 0.0 if value is None else sign * value

    return sorted(trials, key=key)


def best_trial(trials: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best final `metric` (`mode`: `min` or `max`); None when none reported it."""
    ranked = ranked_trials(trials, metric, mode)
    return ranked[0] if ranked and trial_value(ranked[0], metric) is not None else None


def validation_names(trials: list[dict]) -> list[str]:
    """The validation metrics the trials report, in the task's order (`val_loss` first)."""
    names = [METRIC]
    for trial in trials:
        names += [name for name in trial["metrics"] if name not in names]
    return names


def best_config_yaml(job: JobConfig, best: dict) -> str:
    """The best job as a complete kdflow YAML file (secrets excluded; the search section kept)."""
    values = ", ".join(f"{name}={value!r}" for name, value in best["params"].items())
    metric = job.tune.metric
    header = (
        f"# kdflow tune: the best of the search (trial {best['trial']}, {metric} {trial_value(best, metric):.4g} "
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
