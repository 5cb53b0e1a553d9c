"""Running the training loop on Ray Train (Train V2 `TorchTrainer`) or in this process.

`fit(spec, compute, description)` trains one model and returns rank 0's result. With the `ray`
backend, `compute.num_workers` Ray Train workers each run `train_worker` (gloo on CPU, NCCL on
GPUs; Ray Train sets up the process group and `prepare_model` wraps the model in DDP). An
on-policy run with `distill.on_policy.teacher_actors` gets the driver's pool of teacher actors
(`kd_core.train.rollouts.teacher_pool`), made before the workers and killed after. Rank 0
streams its log records to the driver's reporter actor (`kd_core.train.reporter`, one for all of
the run's fits), which the driver polls to draw the progress bar and from which it collects the
final result (with the files rank 0 wrote).

A one-worker training (`compute.single_worker: task`, the default) skips Ray Train: it is one Ray
task running the same `train_worker` with checkpoints on the store, as the local backend writes
them. Ray keeps a finished task's worker process for the next task, so the run's later fits (the
baseline after the distillation, the next step of a pipeline) start in a process that has torch
and kdflow imported, with no controller, worker group or process group to start (on CPUs: a
GPU task's process ends with it, as Ray does by default, so that each fit gets the GPU Ray gave
it). Ray retries the task `compute.max_failures` times when its process dies; it resumes from the
latest checkpoint. Every fit's result carries `startup`: seconds from the fit's start to its
worker process's start (`worker_started`, below 0 for a process that already ran), to the start
of the training loop (`startup`) and to its first log record (`first_log`), which a stage's
manifest keeps in its timings. `benchmarks/startup.py` sets the paths side by side.

The Ray Train run's storage is the stage's checkpoint folder on the configured store (an explicit
pyarrow filesystem wraps the store's fsspec one, so MinIO and other S3 endpoints work). Workers
report checkpoints there; after a worker dies Ray Train restarts the group (up to
`compute.max_failures` times) and they resume from the latest one, as does a later run of the same
step. Once the model is saved the folder is deleted.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import torch

from kd_core.config import ComputeConfig
from kd_core.devtools import free_port
from kd_core.errors import InputError, RunStopped, TrainingDiverged
from kd_core.manifest import Manifest
from kd_core.progress import progress_bar, say
from kd_core.stage import StageLease, StageRun, reused_manifest
from kd_core.storage import Store
from kd_core.train.checkpoints import RayTrainCheckpoints
from kd_core.train.rollouts import teacher_pool
from kd_core.train.spec import TrainSpec
from kd_core.train.loop import train_worker
from kd_core.train.reporter import TrainReporter, fit_reporter, startup, worker_timings

_POLL_SECONDS = 0.5


ADDRESS_ENV, DASHBOARD_ENV = "KDFLOW_RAY_ADDRESS", "KDFLOW_RAY_DASHBOARD"
"""The address and dashboard of a local Ray another kdflow process started, for the processes
that join it (`ray_env`: the kfp.local engine's steps). Not `RAY_ADDRESS`: users set that for
Ray's job submission, often to a dashboard URL, and a local job must not join what it names."""

_started_dashboard: str | None = None


def ensure_ray(compute: ComputeConfig, *, warm: bool = True) -> None:
    """Connect to `compute.ray_address` (else to the Ray in `KDFLOW_RAY_ADDRESS`, which the
    kfp.local engine sets for its steps: `ray_env`), or start a local Ray; once per process, which
    every stage of the run then shares. A new local Ray warms two worker processes (`warm`)."""
    import ray

    global _started_dashboard
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train gives up on a worker group that is not up within 60 s by default; on a busy small
    # machine (concurrent Tune trials, a test suite) starting workers that import torch takes longer.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    common = {"logging_level": "WARNING", "log_to_driver": os.environ.get("KDFLOW_RAY_LOGS") == "1", "configure_logging": True}
    address = compute.ray_address or os.environ.get(ADDRESS_ENV)
    if address:
        dashboard = os.environ.get(DASHBOARD_ENV)
        ray.init(address=address, **common, **({"runtime_env": {"env_vars": {"RAY_ADDRESS": dashboard}}} if dashboard else {}))
        return
    # A new local cluster, with its dashboard on loopback: the dashboard serves Ray's state API,
    # through which Ray Train frees the placement group (the CPUs/GPUs) of a run whose controller
    # died, e.g. a Tune trial ASHA stopped; without it later trials wait forever. The job's workers
    # are told this cluster's dashboard address, because with a second Ray instance on the machine
    # (another kdflow process, a test suite) the state API cannot guess which one is theirs.
    dashboard = f"http://127.0.0.1:{free_port()}"
    # Ray Train's controller looks at its workers every 2 s by default, so a fit's start and end
    # each waited up to that long: with 0.5 s a one-worker Ray Train fit of the tiny job ended
    # 2.2 s after its first log record instead of 5.2 s (benchmarks/startup.py, 2 cores; the whole
    # fit 1.5-2.6 s shorter). The cluster's processes take this process's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(
        address="local",
        num_cpus=compute.num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=int(dashboard.rsplit(":", 1)[1]),
        runtime_env={"env_vars": {"RAY_ADDRESS": dashboard}},
        **common,
    )
    _started_dashboard = dashboard
    if warm:
        _warm_workers(min(WARM_WORKERS, compute.num_cpus or os.cpu_count() or 1))


WARM_WORKERS = 2
"""Worker processes a new local Ray starts importing the training code in at once, beside the
driver's work: the run's first fit and the cache's tasks then find them ready. (Ray's worker
processes serve one job: a process that only hands its Ray to others, the kfp.local engine, does
not warm any.)"""


def _warm_workers(count: int) -> None:
    """Fire `count` tasks that import what a fit and the cache's teacher need (torch, DeepSpeed,
    the training loop) in Ray's prestarted worker processes, which Ray then keeps for later
    tasks. Nothing waits for them."""
    import ray

    warm = ray.remote(num_cpus=1)(_import_training_code)
    for _ in range(count):
        warm.remote()


def _import_training_code() -> None:
    import deepspeed  # noqa: F401  (imported lazily by the loop, at 4 s the largest single import)

    import kd_core.train.loop  # noqa: F401  (torch, the models, the tasks)


def ray_env() -> dict[str, str]:
    """The environment that makes another process's `ensure_ray` join this process's Ray (the
    kfp.local engine's steps, each a subprocess) instead of starting a second one beside it."""
    import ray

    env = {ADDRESS_ENV: ray.get_runtime_context().gcs_address}
    if _started_dashboard:
        env[DASHBOARD_ENV] = _started_dashboard
    return env


def fit(spec: TrainSpec, compute: ComputeConfig, description: str, *, fresh: bool = False) -> dict:
    """Train; with `fresh`, the run's old checkpoints are deleted first instead of resumed from.
    The result holds `startup` (see the module's docstring)."""
    if fresh:
        Store(spec.storage).delete(spec.checkpoint_folder)
    started = time.time()
    with progress_bar(description, total=spec.train.max_steps) as bar:
        if compute.backend == "local":
            reporter = TrainReporter()
            reporter.started("", worker_timings())

            def progress(step: int, record: dict) -> None:
                reporter.update("", step, record)
                bar.update(step, _status(record))

            torch.set_num_threads(compute.cpus_per_worker)
            return {**train_worker(spec, progress=progress, wrap_model=on_gpu_if_any), "startup": startup(reporter.timeline(), started)}
        if compute.num_workers == 1 and compute.single_worker == "task":
            return _fit_in_ray_task(spec, compute, bar, started)
        return _fit_on_ray(spec, compute, bar, started)


def fit_stage(
    run: StageRun, spec: TrainSpec, compute: ComputeConfig, description: str, *, fresh: bool = False, details: dict | None = None,
) -> Manifest:
    """Train into a stage's folder under its lease (`StageLease`: a concurrent run of the same
    step waits, then reuses this one's result), adopt the files rank 0 wrote, and finish the
    stage (its manifest's details: the model's folder, the MLflow run, and `details`); the
    checkpoints are deleted only after the manifest is committed."""
    with StageLease(run.store, run.stage, run.folder, compute.lease_ttl_s, compute.lease_wait_s) as lease:
        if lease.finished_elsewhere:
            return reused_manifest(run)
        with run.timed("train"):
            result = fit(spec, compute, description, fresh=fresh)
        run.timings |= result.pop("startup")
        for record in result.pop("files"):
            run.record(record)
        details = {"model_folder": f"{run.folder}/model", **(details or {})}
        if "mlflow_run_id" in result:
            details["mlflow_run_id"] = result.pop("mlflow_run_id")
        manifest = run.finish(metrics=result, details=details)
    try:
        run.store.delete(spec.checkpoint_folder)
    except Exception as err:  # the step is done; stale checkpoints cost only space
        say(f"[yellow]{run.stage}: could not delete {run.store.url(spec.checkpoint_folder)} ({type(err).__name__}); delete it by hand[/yellow]")
    return manifest


def _status(record: dict) -> str:
    terms = " ".join(f"{name} {record[name]:.3f}" for name in ("loss", "ce", "kd") if name in record)
    generation = f" | gen {record['generated_tokens_per_s']:,.0f} tok/s" if "generated_tokens_per_s" in record else ""
    staleness = f" stale {record['staleness']:.1f}" if "staleness" in record else ""
    return f"{terms} | {record.get('tokens_per_s', 0):,.0f} tok/s{generation}{staleness}"


def ray_train_loop(config: dict) -> None:
    """What each Ray Train worker runs. With a `reporter` actor, rank 0 streams its log records
    and final result to it; with `report_validation` (a Ray Tune trial), every validation is a
    `ray.train.report`, which the trial forwards to Tune's scheduler."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    torch.set_num_threads(config["threads"])
    reporter, fit = config.get("reporter"), config.get("fit", "")
    rank = context.get_world_rank()
    if rank == 0 and reporter is not None:
        reporter.started.remote(fit, worker_timings())

    def progress(step: int, record: dict) -> None:
        if reporter is not None:
            reporter.update.remote(fit, step, record)

    result = train_worker(
        config["spec"],
        rank=rank,
        world_size=context.get_world_size(),
        progress=progress,
        wrap_model=ray.train.torch.prepare_model,
        checkpoints=RayTrainCheckpoints(),
        on_validation=ray.train.report if config.get("report_validation") else None,
        teacher_actors=config.get("teacher_actors"),
    )
    if rank == 0 and reporter is not None:
        ray.get(reporter.finish.remote(fit, result))
    if not config.get("report_validation"):
        ray.train.report({key: value for key, value in result.items() if key != "files"})


def ray_storage(store: Store, folder: str):
    """Ray Train's `storage_path` and `storage_filesystem` for a store folder: a local path, or
    the store's own fsspec filesystem (endpoint, credentials) wrapped for pyarrow, so S3
    endpoints such as MinIO work."""
    if store.is_local:
        return str(store.local_path(folder)), None
    import pyarrow.fs

    return store.path(folder), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))


def torch_trainer(
    spec: TrainSpec, *, workers: int, cpus_per_worker: int, use_gpu: bool, storage_folder: str, name: str,
    loop_config: dict | None = None, **run_options,
):
    """The Ray Train `TorchTrainer` that runs `train_worker` on `workers` ranks for `spec` (a stage's
    fit, or a search trial's): its run lives in `<storage_folder>/<name>` on the job's store;
    `loop_config` adds to what each worker gets (`ray_train_loop`), `run_options` to its `RunConfig`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_storage(Store(spec.storage), storage_folder)
    return TorchTrainer(
        ray_train_loop,
        train_loop_config={"spec": spec, "threads": cpus_per_worker, **(loop_config or {})},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, **run_options),
    )


def on_gpu_if_any(module: torch.nn.Module) -> torch.nn.Module:
    """What Ray Train's `prepare_model` does for one worker: the module on this process's GPU, when
    it has one (a DeepSpeed engine places its module itself)."""
    return module.to("cuda") if torch.cuda.is_available() else module


def one_worker_fit(spec: TrainSpec, threads: int, reporter, fit: str, teacher_actors: dict[str, list] | None) -> dict:
    """What the Ray task of a one-worker fit runs (`compute.single_worker: task`): the training
    loop on rank 0 of 1, checkpointing to the store, streaming its log records to `reporter`."""
    reporter.started.remote(fit, worker_timings())
    torch.set_num_threads(threads)

    def progress(step: int, record: dict) -> None:
        reporter.update.remote(fit, step, record)

    return train_worker(spec, progress=progress, wrap_model=on_gpu_if_any, teacher_actors=teacher_actors)


def _fit_in_ray_task(spec: TrainSpec, compute: ComputeConfig, bar, started: float) -> dict:
    import ray

    ensure_ray(compute)
    check_room_for_actors(spec.on_policy, len(spec.online_teachers()), compute, 1, compute.cpus_per_worker)
    fit = uuid.uuid4().hex
    reporter = fit_reporter(fit)
    # On a GPU the process is not kept (Ray's own default for GPU tasks): a reused process would
    # hold its CUDA context on the GPU of its first task, whichever GPU Ray gives the next one.
    task = ray.remote(
        num_cpus=compute.cpus_per_worker, num_gpus=int(compute.use_gpu), max_calls=1 if compute.use_gpu else 0,
        max_retries=compute.max_failures, retry_exceptions=[OSError],  # a dead process, or the store failing (as Ray Train retries)
    )(one_worker_fit)
    with teacher_pool(spec.storage, spec.online_teachers(), spec.task, spec.on_policy) as teacher_actors:
        pending = task.remote(spec, compute.cpus_per_worker, reporter, fit, teacher_actors)
        done: list = []
        while not done:
            done, _ = ray.wait([pending], timeout=_POLL_SECONDS)
            step, record, _ = ray.get(reporter.poll.remote())
            if record:
                bar.update(step, _status(record))
        try:
            result = ray.get(pending)
        except ray.exceptions.RayTaskError as err:
            # kdflow's own errors (a diverged run, a bad shard) say what happened in one line.
            raise (err.cause if isinstance(err.cause, (InputError, RunStopped)) else err) from None
    return {**result, "startup": startup(ray.get(reporter.timeline.remote()), started)}


def _fit_on_ray(spec: TrainSpec, compute: ComputeConfig, bar, started: float) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig

    ensure_ray(compute)
    check_room_for_actors(spec.on_policy, len(spec.online_teachers()), compute, compute.num_workers, compute.cpus_per_worker)
    fit = uuid.uuid4().hex
    reporter = fit_reporter(fit)
    with teacher_pool(spec.storage, spec.online_teachers(), spec.task, spec.on_policy) as teacher_actors:
        # The run lives in the stage's checkpoint folder: a rerun of the same step finds Ray Train's
        # record of it there and resumes from its latest checkpoint.
        trainer = torch_trainer(
            spec, workers=compute.num_workers, cpus_per_worker=compute.cpus_per_worker, use_gpu=compute.use_gpu,
            storage_folder=spec.output_folder, name=spec.checkpoint_folder.rsplit("/", 1)[-1],
            loop_config={"reporter": reporter, "fit": fit, "teacher_actors": teacher_actors},
            failure_config=FailureConfig(max_failures=compute.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        )
        failure: list[BaseException] = []
        thread = threading.Thread(target=lambda: _capture(trainer.fit, failure), daemon=True)
        thread.start()
        while thread.is_alive():
            step, record, _ = ray.get(reporter.poll.remote())
            if record:
                bar.update(step, _status(record))
            time.sleep(_POLL_SECONDS)
        thread.join()
    if failure:
        raise _diverged_worker(failure[0]) or failure[0]
    step, record, result = ray.get(reporter.poll.remote())
    bar.update(step, _status(record) if record else "")
    if result is None:
        raise RuntimeError("Ray Train finished but rank 0 reported no result; see the Ray worker logs")
    return {**result, "startup": startup(ray.get(reporter.timeline.remote()), started)}


def check_room_for_actors(
    settings, teachers: int, compute: ComputeConfig, workers: int, cpus_per_worker: int, concurrent: int = 1,
) -> None:
    """On a local Ray (no `compute.ray_address`: nothing will add nodes), an on-policy run (or
    `concurrent` search trials) whose workers and actors reserve more CPUs or GPUs than the
    machine has would wait forever: refuse it, naming what to lower. `settings`:
    `distill.on_policy` (None: not on-policy); `teachers`: the teachers with actor pools."""
    import ray

    if settings is None or compute.ray_address:
        return
    generation = workers * settings.generation_actors
    pools = settings.teacher_actors * teachers
    if not generation and not pools:
        return
    total = ray.cluster_resources()
    per_actor = {"CPU": settings.actor_cpus, "GPU": settings.actor_gpus}
    per_worker = {"CPU": cpus_per_worker, "GPU": int(compute.use_gpu)}
    trials = f"{concurrent} concurrent trials × " if concurrent > 1 else ""
    for resource in ("CPU", "GPU"):
        needed = concurrent * (workers * per_worker[resource] + generation * per_actor[resource]) + pools * per_actor[resource]
        if needed > total.get(resource, 0) + 1e-9:
            raise ValueError(
                f"distill.on_policy: {trials}({workers} training workers × {per_worker[resource]:g} {resource} + {generation} generation "
                f"actors × actor_{resource.lower()}s {per_actor[resource]:g}) + {pools} teacher actors × {per_actor[resource]:g} need "
                f"{needed:g} {resource}s, and this Ray has {total.get(resource, 0):g}; lower distill.on_policy.actor_{resource.lower()}s "
                "(a fraction shares one), the actor counts, compute.cpus_per_worker" + (" or tune.max_concurrent" if concurrent > 1 else "")
                + ", or raise compute.num_cpus"
            )


def _diverged_worker(error: BaseException) -> TrainingDiverged | None:
    """The `TrainingDiverged` a worker raised, out of Ray Train's `WorkerGroupError` (every rank
    raises it at the same step; the CLI reports it in one line), or None."""
    for failure in getattr(error, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, TrainingDiverged):
                return failure
            failure = failure.__cause__
    return None


def _capture(function, failures: list[BaseException]) -> None:
    try:
        function()
    except BaseException as err:  # re-raised in the driver thread
        failures.append(err)
