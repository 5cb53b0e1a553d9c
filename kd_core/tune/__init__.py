"""Hyperparameter search over distillation settings on Ray Tune (the tune stage,
`kd_core/stages/tune.py`, runs it).

Every trial is a short distillation of the student (Ray Train workers inside one Ray Tune trial)
from the prep stage's tokens and the cache stage's teacher targets (or the online teacher), which
all trials share and none recomputes. Each trial applies its values to the fields of
`tune.space`, trains `tune.max_steps` steps and reports `val_loss` every `tune.eval_every` steps:
what the job's task validates a student on (`Task.validation_loss`: a language model's
cross-entropy on validation rows, a reward student's preference KL to the teacher on validation
pairs, whose teacher rewards the cache stage computed). Optuna's TPE proposes the values (at most
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

import os

import yaml

from kd_core.config import SearchDimension, public_dict
from kd_core.job import JobConfig, set_dotted, validate_config
from kd_core.manifest import Manifest

METRIC = "val_loss"
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
