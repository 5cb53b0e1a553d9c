"""The tune stage: a search over distillation settings, whose best trial is the job to run next.

Each trial is a short distillation with the trial's values (`kd_core/tune/search.py`), on the prep
and cache (or online teacher) outputs every trial shares; ASHA stops the weak ones early. The
stage writes `best_config.yaml` (the complete best job), `trials.json`, `tune.png` and the Ray
Tune experiment, and logs an MLflow parent run with a child run per trial. The best trial is the
best on `tune.metric`, in the direction the task gives it.
"""

from __future__ import annotations

import json

from kd_core.cache import cache_shards
from kd_core.job import JobConfig
from kd_core.manifest import Manifest, ManifestError
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.tasks import task_named
from kd_core.train.spec import student_start
from kd_core.tune import BEST_CONFIG_NAME, PLOT_NAME, TRIALS_NAME, best_config_yaml, best_trial, job_with, metric_mode
from kd_core.tune.report import importance, tune_png
from kd_core.tune.search import log_parent_run, run_search


def tune(
    config: JobConfig, prep: Manifest, targets: Manifest, store: Store, *, teacher: Manifest | None = None, force: bool = False,
    more_targets: dict[str, Manifest] | None = None,
) -> Manifest:
    """Run (or resume, or reuse) the search of `config.tune` on the prep and cache/teacher outputs.
    `teacher` (the teacher step's manifest) is read by students cut from it (`student.init:
    from_teacher`); every trial resolves its own start (`student_start`), as the distill stage does.
    `more_targets`: the named teachers' (`teachers:`) cache or teacher manifests."""
    if not config.tune.space:
        raise ValueError("tune.space is empty: list the fields to search, e.g. distill.loss.kd_weight: {kind: uniform, low: 0.2, high: 0.9}")
    task = task_named(config.task)
    section = {
        "tune": config.tune.model_dump(mode="json"),
        "distill": config.distill.model_dump(mode="json", include={"loss", "train", "deepspeed", "teacher_source", task.objective_field})
        | ({"on_policy": config.distill.on_policy.key_settings()} if config.distill.teacher_source == "on_policy" else {})
        | ({"route": config.distill.route} if config.distill.route else {})
        | ({"teacher_weights": config.distill.teacher_weights} if config.distill.teacher_weights else {}),
        # A config student's section as it was before `student.init` and `student.tokenizer` existed
        # (its keys stay); a student's own tokenizer is an input step (`Task.student_inputs`).
        # `student.embedding` and `student.mlp` (embedding, tabular) only where not the default, so the others' keys stay too.
        "student": config.student.model_dump(mode="json", exclude=_unkeyed_student_fields(config.student)),
    }
    _check_validation_targets(task, targets)
    teacher = teacher if teacher is not None or targets.stage != "teacher" else targets
    start = student_start(config.student, prep, store, teacher, data_ids=task.pretrained_reads_data_ids)
    if start.weights_identity is not None:
        section["student_weights"] = start.weights_identity
    more_targets = more_targets or {}
    own = task.student_inputs(config.student, prep, store, force=force)
    inputs = {
        "prep": prep, **start.inputs(), **own, targets.stage: targets, **{f"{targets.stage}:{name}": m for name, m in more_targets.items()},
    }
    run = StageRun(store, "tune", section, inputs=inputs, force=force)
    if run.reused:
        return run.reused
    with run.timed("search"):
        trials, parent_run_id = run_search(
            config, prep, targets, store, run.folder, fresh=force, teacher=teacher, more_targets=more_targets, student_inputs=own,
        )
    metric, mode = metric_mode(config)
    best = best_trial(trials, metric, mode)
    if best is None:
        errors = [trial["error"].strip().splitlines()[-1] for trial in trials if trial["error"]]
        cause = f"; the first trial's error: {errors[0]}" if errors else ""
        raise RuntimeError(f"tune: none of the {len(trials)} trials reported {metric}{cause}; see the Ray logs (KDFLOW_RAY_LOGS=1)")
    run.write_bytes(BEST_CONFIG_NAME, best_config_yaml(job_with(config, best["params"]), best).encode())
    run.write_bytes(TRIALS_NAME, json.dumps(trials, indent=2).encode())
    importances = importance(trials, config.tune.space, metric, mode)
    run.write_bytes(PLOT_NAME, tune_png(trials, importances, config.tune, task.validation_metric_label(metric), mode))
    metrics = {
        **{f"best_{name}": value for name, value in best["metrics"].items() if value is not None},
        **(task.best_trial_metrics(best["val_loss"]) if best["val_loss"] is not None else {}),
        "trials": len(trials),
        "finished": sum(trial["status"] == "finished" for trial in trials),
        "stopped_early": sum(trial["status"] == "stopped early" for trial in trials),
        "errored": sum(trial["status"] == "error" for trial in trials),
    }
    details = {
        "best_trial": best["trial"], "best_params": best["params"], "metric": metric, "mode": mode, "importance": importances,
        "mlflow_parent_run_id": parent_run_id,
    }
    log_parent_run(config, parent_run_id, metrics, best["params"], run)
    return run.finish(metrics=metrics, details=details)


def _check_validation_targets(task, targets: Manifest) -> None:
    """A student whose validation reads the cache (a reward student: the teacher's rewards of the
    validation pairs) needs a cache of the validation split; caches made before kdflow cached it lack it."""
    if task.validation_reads_cache() and targets.stage == "cache" and not cache_shards(targets, "val"):
        raise ManifestError(
            f"{targets.folder}: this cache has no teacher targets of the validation split, which every trial "
            "validates against (it was made before kdflow cached them); rerun that step: add --force cache to the command"
        )


def _unkeyed_student_fields(student) -> set[str]:
    """The student fields a search's key leaves out: its own tokenizer (an input step), the start
    fields of a config student, and the embedding and MLP settings at their defaults."""
    from kd_core.config import MLPConfig, SentenceEmbeddingConfig

    unkeyed = {"init", "path", "from_teacher", "tokenizer"} if student.init == "config" else {"tokenizer"}
    unkeyed |= {"embedding"} if student.embedding == SentenceEmbeddingConfig() else set()
    return unkeyed | ({"mlp"} if student.mlp == MLPConfig() else set())
