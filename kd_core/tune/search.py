"""Ray Tune's side of the tune stage: the trials, the Tuner (new or restored), MLflow runs.

A trial is a Ray Tune function trainable running the distill stage's worker loop
(`train_worker`) with validation on; each `{step, val_loss, ...}` report (every validation metric
of the task) goes to Tune, where ASHA may stop the trial on `tune.metric`; MLflow's callback logs
every metric on the trial's child run. A one-worker trial (`compute.single_worker: task`) trains
inside the trial's own process, which reserves the worker's CPUs (and GPU) and which Tune reuses
for the next trial (`reuse_actors`): no trial after the first pays for a new process, imports or
a process group. A trial with more workers (or `single_worker: ray_train`) starts a Ray Train
`TorchTrainer` (`ray_train_loop`), whose `TuneReportCallback` forwards the reports; that trial
itself holds no CPU, its workers reserve what they train with. Trials keep no checkpoints: a
restored search runs an unfinished trial again from its start. An on-policy search's trials share
one pool of teacher actors, made for the search.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from kd_core.config import TuneConfig
from kd_core.job import JobConfig
from kd_core.manifest import Manifest
from kd_core.progress import say
from kd_core.stage import StageRun
from kd_core.storage import Store, absolute_url
from kd_core.tasks import task_named, task_of
from kd_core.tune import METRIC, PARENT_RUN_NAME, job_with, metric_mode, quiet, search_space
from kd_core.tune.state import DIGESTS_NAME, SEARCH_FOLDER, check_search_state, search_storage

TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
"""A trial that only drives Ray Train; a CPU for it would halve the concurrent trials on a small
machine. Ray needs a non-empty request, hence a token amount of memory."""


def trains_in_trial(config: JobConfig) -> bool:
    """Whether a trial trains in its own process (one worker, `compute.single_worker: task`)."""
    return (config.tune.workers_per_trial or config.compute.num_workers) == 1 and config.compute.single_worker == "task"


def trial_resources(config: JobConfig) -> dict:
    """What a trial's own process reserves: its worker's CPUs (and GPU) when it trains itself."""
    if not trains_in_trial(config):
        return TRIAL_DRIVER_RESOURCES
    return {"CPU": config.tune.cpus_per_worker or config.compute.cpus_per_worker, "GPU": int(config.compute.use_gpu)}


def run_search(
    config: JobConfig, prep: Manifest, targets: Manifest, store: Store, folder: str, *, fresh: bool, teacher: Manifest | None = None,
    more_targets: dict[str, Manifest] | None = None, student_inputs: dict[str, Manifest] | None = None,
) -> tuple[list[dict], str | None]:
    """Run the search into `<folder>/search` (restoring it when a previous run left one, after
    checking that this step wrote its state: `kd_core.tune.state`) and return every trial's
    summary and the MLflow parent run's id. `teacher`: the teacher step's manifest, from which a
    trial's student is cut (`student.init: from_teacher`). `student_inputs`: the steps
    `Task.student_inputs` ran, which every trial's student reads."""
    from ray import tune as ray_tune

    from kd_core.train.ray_glue import check_room_for_actors, ensure_ray
    from kd_core.train.rollouts import teacher_pool

    settings = config.tune
    steps = settings.max_steps or config.distill.train.max_steps
    metric, mode = metric_mode(config)
    s3 = config.storage.s3
    if not store.is_local and (s3.access_key_id is not None or s3.secret_access_key is not None):
        say("[yellow]tune: Ray Tune keeps its storage filesystem, with the storage.s3 credentials given in the config, in its "
            "experiment state (search/tuner.pkl) on storage.root; give them through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or a Kubernetes secret) instead[/yellow]")
    if fresh:
        store.delete(f"{folder}/{SEARCH_FOLDER}")
        store.delete(f"{folder}/{DIGESTS_NAME}")
    check_search_state(store, folder)
    ensure_ray(config.compute)
    parent_run_id = _parent_run(config, store, folder)
    # Trials run in folders of Ray's choosing: a relative local root (runs/artifacts) or student
    # folder must reach them as the absolute path it means here.
    student = config.student.model_copy(update={"path": absolute_url(config.student.path)}) if config.student.path else config.student
    job = config.model_copy(update={"storage": store.config, "student": student})
    on_policy = config.distill.on_policy if config.distill.teacher_source == "on_policy" else None
    online = {"teacher": targets, **(more_targets or {})} if targets.stage == "teacher" else {}
    if config.distill.teacher_weights:
        online = {name: manifest for name, manifest in online.items() if config.distill.teacher_weights.get(name, 0) > 0}
    check_room_for_actors(
        on_policy, len(online), config.compute, settings.workers_per_trial or config.compute.num_workers,
        settings.cpus_per_worker or config.compute.cpus_per_worker, settings.max_concurrent,
    )
    with teacher_pool(store.config, online, task_of(prep), on_policy) as teacher_actors:
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(
                run_trial, job=job, prep=prep, targets=targets, folder=folder, teacher=teacher, teacher_actors=teacher_actors,
                more_targets=more_targets, student_inputs=student_inputs,
            ),
            trial_resources(config),
        )
        results = _fit_search(config, trainable, store, folder, parent_run_id, steps, metric, mode)
    names = tuple(task_named(config.task).validation_modes)
    return [_summary(result, steps, names) for result in results], parent_run_id


def _fit_search(config: JobConfig, trainable, store: Store, folder: str, parent_run_id: str | None, steps: int, metric: str, mode: str):
    """Restore the search Ray Tune left in `<folder>/search`, or start it; run it to the end."""
    from ray import tune as ray_tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    settings = config.tune
    storage_path, storage_filesystem = search_storage(store, folder)
    experiment = f"{storage_path}/{SEARCH_FOLDER}"
    if ray_tune.Tuner.can_restore(experiment, storage_filesystem=storage_filesystem):
        print(f"tune: resuming the search in {store.url(folder)}/{SEARCH_FOLDER}; finished trials are kept", flush=True)
        tuner = ray_tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_filesystem
        )
    else:
        searcher = ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=settings.max_concurrent)
        tuner = ray_tune.Tuner(
            trainable,
            param_space=search_space(settings.space),
            tune_config=ray_tune.TuneConfig(
                metric=metric, mode=mode, num_samples=settings.num_trials, search_alg=searcher, scheduler=asha_scheduler(settings, steps),
                max_concurrent_trials=settings.max_concurrent, reuse_actors=trains_in_trial(config),
            ),
            run_config=ray_tune.RunConfig(
                name=SEARCH_FOLDER, storage_path=storage_path, storage_filesystem=storage_filesystem,
                callbacks=_mlflow_callbacks(config, parent_run_id), verbose=0 if quiet() else 1,
            ),
        )
    return tuner.fit()


def asha_scheduler(settings: TuneConfig, steps: int):
    """ASHA on the optimizer step a report comes from: the first rung at `grace_period` validations,
    a trial behind the best 1 / `reduction_factor` of those that reached a rung is stopped there."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step", max_t=steps, grace_period=settings.eval_every * settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def run_trial(
    params: dict, *, job: JobConfig, prep: Manifest, targets: Manifest, folder: str, teacher: Manifest | None = None,
    teacher_actors: dict[str, list] | None = None, more_targets: dict[str, Manifest] | None = None,
    student_inputs: dict[str, Manifest] | None = None,
) -> None:
    """One trial: a short Ray Train distillation with the trial's values, reporting its validation
    metrics. Its student starts where the trial's `student` section says (`student_start`: a
    search may vary `student.from_teacher`), cut from `teacher` for `init: from_teacher`. An
    on-policy search's trials share the search's `teacher_actors`."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kd_core.train.ray_glue import torch_trainer
    from kd_core.train.spec import student_spec, student_start

    trial_job = job_with(job, params)
    settings, distill = job.tune, trial_job.distill
    trial_id = ray_tune.get_context().get_trial_id()
    store = Store(job.storage)
    train = distill.train.model_copy(update={"max_steps": settings.max_steps or distill.train.max_steps})
    spec = student_spec(
        task_of(prep), distill, trial_job.student, prep, store, f"{folder}/trials/{trial_id}", targets=targets, train=train,
        validate_every=settings.eval_every, validation_rows=settings.val_rows,
        start=student_start(trial_job.student, prep, store, teacher, data_ids=task_of(prep).pretrained_reads_data_ids), more_targets=more_targets,
        student_inputs=student_inputs,
    )
    cpus = settings.cpus_per_worker or job.compute.cpus_per_worker
    if trains_in_trial(job):
        import torch

        from kd_core.train.loop import train_worker
        from kd_core.train.ray_glue import on_gpu_if_any

        # When ASHA stops this trial, Tune reuses the process for the next one once this thread
        # has wound down (data readers, prefetch), which it waits 2 s for by default and then
        # fails the next trial; this process's own setting, read at that moment.
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
        torch.set_num_threads(cpus)
        train_worker(spec, wrap_model=on_gpu_if_any, on_validation=ray_tune.report, teacher_actors=teacher_actors)
        return
    torch_trainer(
        spec, workers=settings.workers_per_trial or job.compute.num_workers, cpus_per_worker=cpus, use_gpu=job.compute.use_gpu,
        storage_folder=f"{folder}/trials", name=trial_id, loop_config={"report_validation": True, "teacher_actors": teacher_actors},
        callbacks=[TuneReportCallback()],
    ).fit()


def _summary(result, steps: int, names: tuple[str, ...]) -> dict:
    """One trial as plain data: values, the reports ([step, value]) and final value of each
    validation metric of `names` (`reports` and `val_loss`: `val_loss`'s; `metric_reports` and
    `metrics`: every one's, None where it never reported), and how it ended."""
    metric_reports: dict[str, list] = {}
    frame = result.metrics_dataframe
    for name in names:
        metric_reports[name] = []
        if frame is not None and name in frame:
            reported = frame.dropna(subset=[name])
            metric_reports[name] = [[int(step), float(value)] for step, value in zip(reported["step"], reported[name])]
    reports = metric_reports.get(METRIC, [])
    last_step = reports[-1][0] if reports else 0
    if result.error is not None:
        status = "error"
    elif last_step >= steps:
        status = "finished"
    else:
        status = "stopped early"
    return {
        "trial": result.metrics.get("trial_id") if result.metrics else os.path.basename(result.path),
        "params": {name: _plain(value) for name, value in result.config.items()},
        "reports": reports,
        "val_loss": reports[-1][1] if reports else None,
        "metric_reports": metric_reports,
        "metrics": {name: values[-1][1] if values else None for name, values in metric_reports.items()},
        "steps": last_step,
        "status": status,
        "error": str(result.error)[-500:] if result.error is not None else None,  # the end names the cause
    }


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------ MLflow
def _parent_run(config: JobConfig, store: Store, folder: str) -> str | None:
    """The MLflow run the trials are children of: created once, found again on a resumed search."""
    import mlflow
    from mlflow import MlflowClient

    from kd_core.train.tracking import experiment_id

    record = f"{folder}/{PARENT_RUN_NAME}"
    if store.exists(record):
        return json.loads(store.read_bytes(record))["run_id"]
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    parent = client.create_run(experiment_id(config.registry), run_name=f"tune-{config.name}", tags={"kdflow.stage": "tune"})
    client.log_dict(parent.info.run_id, {name: dimension.model_dump(exclude_none=True) for name, dimension in config.tune.space.items()}, "search_space.json")
    store.write_bytes(record, json.dumps({"run_id": parent.info.run_id}).encode())
    return parent.info.run_id


def _mlflow_callbacks(config: JobConfig, parent_run_id: str | None) -> list:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [
        MLflowLoggerCallback(
            tracking_uri=config.registry.tracking_uri, experiment_name=config.registry.experiment,
            tags={"mlflow.parentRunId": parent_run_id, "kdflow.stage": "tune-trial"}, save_artifact=False,
        )
    ]


def log_parent_run(config: JobConfig, parent_run_id: str | None, metrics: dict, best_params: dict, run: StageRun) -> None:
    """Best values and metrics, the trials table, the plot and the best config on the parent run."""
    from mlflow import MlflowClient

    from kd_core.models import temporary_dir
    from kd_core.tune import BEST_CONFIG_NAME, PLOT_NAME, TRIALS_NAME

    if parent_run_id is None:
        return
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(parent_run_id, name, float(value))
    for name, value in best_params.items():
        client.log_param(parent_run_id, f"best.{name}", str(value))
    with temporary_dir("tune-") as local:
        for name in (BEST_CONFIG_NAME, TRIALS_NAME, PLOT_NAME):
            (Path(local) / name).write_bytes(run.store.read_bytes(run.relative(name)))
            client.log_artifact(parent_run_id, str(Path(local) / name))
    client.set_terminated(parent_run_id)
