"""Checkpoints and resume: a crashed run continues with the same losses; a killed Ray worker is
restarted and resumes; checkpoints are never unpickled and never resumed into another world size.

Run: .venv/bin/python -m pytest tests/test_checkpoints.py
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kd_core.devtools import migrated_sqlite_uri
from kd_core.stages.cache import cache
from kd_core.job import load_config, validate_config
from kd_core.stages.prep import prep
from kd_core.storage import Store
from kd_core.train.checkpoints import (
    CheckpointError,
    load_rank_state,
    load_stream_positions,
    save_rank_state,
    weights_only_checkpoint_engine_class,
)
from kd_core.stages.distill import distill
from kd_core.tasks import task_of
from kd_core.train.spec import TrainSpec
from kd_core.train.loop import train_worker, training_batches
from kd_core.train.ray_glue import fit
from kd_core.stages.teacher import teacher
from kd_core.train.tracking import TrainingRun

REPO = Path(__file__).resolve().parents[1]
RESUMABLE = ["distill.train.max_steps=12", "distill.train.log_every=1", "distill.checkpoint_every=4", "distill.train.dropout=0.1"]


class SimulatedCrash(RuntimeError):
    pass


def crash_at(step: int):
    def progress(done: int, record: dict) -> None:
        if done == step:
            raise SimulatedCrash(f"crashed at step {step}")

    return progress


def stage_outputs(config, store):
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, config.compute)
    return prepared, cache(config.cache, prepared, taught, store, config.compute)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    config = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={folder}", "compute.backend=local", *RESUMABLE])
    store = Store(config.storage)
    return config, store, *stage_outputs(config, store)


def student_spec(job, output_folder: str, runner: str) -> TrainSpec:
    config, store, prepared, cached = job
    deepspeed = None if runner == "plain" else config.distill.deepspeed.model_copy(update={"zero_stage": int(runner[-1])})
    return TrainSpec.from_prep(
        prepared, store, output_folder, config.student.architecture, config.distill.train, task=task_of(prepared),
        objective=config.distill.loss, deepspeed=deepspeed, cache=cached, checkpoint_every=config.distill.checkpoint_every,
    )


def history(store: Store, folder: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(f"{folder}/history.jsonl").decode().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["plain", "zero2", "zero3"])
def test_a_crashed_run_resumes_from_its_checkpoint_with_the_same_losses(job, runner):
    store = job[1]
    whole = student_spec(job, f"whole-{runner}", runner)
    train_worker(whole)
    interrupted = student_spec(job, f"interrupted-{runner}", runner)
    with pytest.raises(SimulatedCrash):
        train_worker(interrupted, progress=crash_at(7))
    assert sorted(path.rsplit("/", 1)[-1] for path in store.fs.ls(store.path(interrupted.checkpoint_folder))) == ["step-00000004"]
    result = train_worker(interrupted)
    assert result["resumed_from_step"] == 4
    resumed, reference = history(store, interrupted.output_folder), history(store, whole.output_folder)
    # Weights, optimizer moments, schedule, dropout RNG and data position all restored: the same run.
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in reference])


@pytest.mark.slow
@pytest.mark.parametrize("data_workers", [0, 2])
def test_a_resume_reads_back_its_buffers_not_the_steps_before_it(job, capsys, data_workers):
    """Resumed at step 96 (768 rows in), a run reads back only the shards its consumers' shuffle
    buffers reference and the ones they were reading, and trains on exactly the batches an
    uninterrupted run did, with DataLoader workers too (the worker whose turn was next serves
    first). The same checkpoint without its stream positions (as an older kdflow wrote it) still
    resumes to the same losses, by replaying every batch before the step."""
    config, store = job[0], job[1]
    train = config.distill.train.model_copy(update={"max_steps": 100, "shuffle_buffer": 16, "data_workers": data_workers})

    def spec(folder: str) -> TrainSpec:
        return TrainSpec.from_prep(job[2], store, folder, config.student.architecture, train, task=task_of(job[2]), checkpoint_every=48)

    whole, interrupted = spec(f"reads-whole-{data_workers}"), spec(f"reads-interrupted-{data_workers}")
    train_worker(whole)
    with pytest.raises(SimulatedCrash):
        train_worker(interrupted, progress=crash_at(98))
    checkpoint = f"{interrupted.checkpoint_folder}/step-00000096"
    saved = json.loads(store.read_bytes(f"{checkpoint}/stream-0.json"))
    assert saved["workers"] == max(1, data_workers) and saved["batches"] == 96
    referenced = {shard for position in saved["positions"].values() for _, shard, _ in position["buffer"]}
    rows_per_shard, rows_before = 64, 96 * train.batch_size

    reference = pytest.approx([r["loss"] for r in history(store, whole.output_folder)], rel=1e-5)
    resumed = train_worker(interrupted)
    assert resumed["resumed_from_step"] == 96
    assert [r["loss"] for r in history(store, interrupted.output_folder)] == reference
    assert 0 < resumed["resume_rows_read"] <= rows_per_shard * (len(referenced) + len(saved["positions"])) < rows_before

    store.delete(f"{checkpoint}/stream-0.json")
    capsys.readouterr()
    replayed = train_worker(interrupted)
    assert "holds no data-stream positions (an older kdflow wrote it): replaying the stream up to it" in capsys.readouterr().out
    assert replayed["resumed_from_step"] == 96 and replayed["resume_rows_read"] >= rows_before
    assert [r["loss"] for r in history(store, interrupted.output_folder)] == reference


def test_a_resumed_run_logs_each_step_once_to_its_mlflow_run(job, tmp_path):
    from mlflow import MlflowClient

    registry = job[0].registry.model_copy(update={"tracking_uri": migrated_sqlite_uri(tmp_path / "mlflow.db")})
    spec = student_spec(job, "tracked", "plain")
    spec.tracking = TrainingRun.for_job(registry, "resumed", {"distill.train.max_steps": 12})
    with pytest.raises(SimulatedCrash):
        train_worker(spec, progress=crash_at(7))  # steps 1-7 logged, checkpoint at 4
    result = train_worker(spec)  # resumes from the checkpoint at 4: steps 5-7 are trained again
    assert result["resumed_from_step"] == 4
    client = MlflowClient(registry.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["distill.train.max_steps"] == "12"
    for metric in ("loss", "lr", "samples_seen"):
        assert sorted(point.step for point in client.get_metric_history(run.info.run_id, metric)) == list(range(1, 13)), metric


TEACHER_STEP_SCRIPT = (
    "import sys, json\n"
    "from kd_core.job import validate_config\n"
    "from kd_core.manifest import Manifest\n"
    "from kd_core.storage import Store\n"
    "from kd_core.stages.teacher import teacher\n"
    "config = validate_config(json.loads(sys.argv[1]))\n"
    "prepared = Manifest.from_json(sys.argv[2], \"prep manifest\")\n"
    "taught = teacher(config.teacher, prepared, Store(config.storage), config.compute, checkpointing=config.distill)\n"
    "print(json.dumps(taught.metrics))\n"
)
"""The teacher step as its own driver process: argv holds the job's config and the prep manifest;
it prints the teacher manifest's metrics."""


@pytest.mark.slow
def test_a_killed_teacher_resumes_from_its_checkpoint(job):
    """The teacher step checkpoints like a student (`distill.checkpoint_every`): SIGKILLed midway,
    the rerun of the same step continues from its latest checkpoint."""
    config, store, prepared = job[0], job[1], job[2]
    raw = config.model_dump(mode="json")
    raw["teacher"]["train"]["max_steps"] = 200  # killed long before the end (a step takes milliseconds)
    environment = dict(os.environ, KDFLOW_QUIET="1", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", TEACHER_STEP_SCRIPT, json.dumps(raw), prepared.to_json()], env=environment)
    try:
        deadline = time.monotonic() + 240
        while not list(store.fs.glob(store.path("teacher/*/checkpoints/step-*/COMPLETE"))):
            assert child.poll() is None and time.monotonic() < deadline, "the teacher wrote no checkpoint"
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    # The same step (same key: max_steps is part of it) resumes; the checkpoints go once it is saved.
    taught = teacher(validate_config(raw).teacher, prepared, store, config.compute, checkpointing=config.distill)
    assert 4 <= taught.metrics["resumed_from_step"] < 200, taught.metrics["resumed_from_step"]
    assert not store.exists(f"{taught.folder}/checkpoints") and "model/model.safetensors" in taught.outputs


@pytest.mark.slow
def test_a_rerun_after_its_ray_driver_was_killed_resumes_from_its_checkpoint(job):
    """The path a cluster retry takes: the teacher step on the Ray backend, its driver and the
    local Ray cluster it started SIGKILLed once Ray Train has recorded a checkpoint; a rerun of the
    same step finds Ray Train's record of the run in the step's folder, resumes from its latest
    checkpoint (stream positions included) and finishes."""
    import signal

    import psutil

    config, store, prepared = job[0], job[1], job[2]
    raw = config.model_dump(mode="json")
    raw["teacher"]["train"] |= {"max_steps": 120, "shuffle_buffer": 16}  # its own step key; killed long before the end
    raw["distill"]["checkpoint_every"] = 30  # each checkpoint is a Ray Train report: few of them
    # Ray Train for its one worker (a one-worker fit is a Ray task by default): the cluster path.
    raw["compute"] |= {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1, "single_worker": "ray_train"}
    arguments = [sys.executable, "-c", TEACHER_STEP_SCRIPT, json.dumps(raw), prepared.to_json()]
    environment = dict(os.environ, KDFLOW_QUIET="1", PYTHONPATH=str(REPO))
    earlier = set(store.fs.glob(store.path("teacher/*")))
    # Its own process group: ray.init starts the local cluster's processes (GCS, raylet, workers) in it.
    driver = subprocess.Popen(arguments, env=environment, start_new_session=True, stdout=subprocess.DEVNULL)
    cluster: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        snapshots = store.path("teacher/*/checkpoints/checkpoint_manager_snapshot.json")  # Ray Train's record of the run
        while not any(b"step-" in store.fs.cat_file(path) for path in store.fs.glob(snapshots) if path.rsplit("/checkpoints/", 1)[0] not in earlier):
            assert driver.poll() is None and time.monotonic() < deadline, "the teacher recorded no checkpoint with Ray Train"
            time.sleep(0.05)
        cluster = psutil.Process(driver.pid).children(recursive=True)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        for process in cluster:  # any that left the group
            with contextlib.suppress(psutil.Error):
                process.kill()
        _, alive = psutil.wait_procs(cluster, timeout=30)
    assert not alive, f"Ray processes of the killed driver are still running: {alive}"
    rerun = subprocess.run(arguments, env=environment, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert metrics["resumed_from_step"] in (30, 60, 90), metrics["resumed_from_step"]
    # The stream positions came back through Ray Train's checkpoint: the resume read back its
    # 16-row buffer's shards, fewer rows than the steps before it (a replay reads all of those).
    assert 0 < metrics["resume_rows_read"] < metrics["resumed_from_step"] * config.teacher.train.batch_size, metrics
    taught = [folder for folder in store.fs.glob(store.path("teacher/*")) if folder not in earlier]
    assert len(taught) == 1 and store.fs.exists(f"{taught[0]}/manifest.json") and not store.fs.exists(f"{taught[0]}/checkpoints")


def test_a_fresh_run_ignores_old_checkpoints_and_a_finished_run_deletes_them(job):
    config, store = job[0], job[1]
    spec = student_spec(job, "fresh", "zero2")
    with pytest.raises(SimulatedCrash):
        train_worker(spec, progress=crash_at(6))
    assert store.exists(f"{spec.checkpoint_folder}/step-00000004/COMPLETE")
    result = fit(spec, config.compute, "fresh", fresh=True)
    assert result["resumed_from_step"] == 0
    # The distill stage resumes by default (`distill.resume: auto`) and cleans up after itself.
    manifest = distill(config.distill, config.student, job[2], job[3], store, config.compute)
    assert not store.exists(f"{manifest.folder}/checkpoints") and "model/model.safetensors" in manifest.outputs


def test_a_checkpoint_from_another_world_size_is_refused(tmp_path):
    save_rank_state(tmp_path, rank=0, world_size=2, step=40)
    save_rank_state(tmp_path, rank=1, world_size=2, step=40)
    assert load_rank_state(tmp_path, rank=1, world_size=2) == 40
    with pytest.raises(CheckpointError, match="written by 2 workers.*compute.num_workers=2"):
        load_rank_state(tmp_path, rank=0, world_size=1)


def test_stream_positions_that_do_not_fit_the_run_are_refused(job, tmp_path):
    (tmp_path / "stream-0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"stream-0.json: not valid JSON .*distill.resume=never"):
        load_stream_positions(tmp_path, rank=0)
    assert load_stream_positions(tmp_path, rank=1) is None  # an older checkpoint: replayed
    spec = student_spec(job, "misfit", "plain")
    with pytest.raises(CheckpointError, match="read by 2 data workers per rank and this run has train.data_workers=0"):
        training_batches(spec, 0, 1, 1, {"format": 1, "workers": 2, "batches": 8, "positions": {}})


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_deepspeed_checkpoints_are_loaded_without_unpickling_code(tmp_path):
    engine = weights_only_checkpoint_engine_class()(None)
    torch.save({"state": torch.ones(2)}, tmp_path / "good.pt")
    assert torch.equal(engine.load(str(tmp_path / "good.pt"))["state"], torch.ones(2))
    torch.save({"state": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(str(tmp_path / "evil.pt"))


@contextlib.contextmanager
def killing_one_process(named: str, once: Callable[[], bool], poll_s: float = 0.05) -> Iterator[list[int]]:
    """While the block runs, SIGKILL the first process of this test's Ray (Ray's processes descend
    from the process that started it; another pytest worker has its own) whose command line holds
    `named`, as soon as `once()` is true; yields the killed pids (none if `once` never was)."""
    import psutil

    killed: list[int] = []
    finished = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 600
        while not once():
            if finished.is_set() or time.monotonic() > deadline:
                return  # nothing to resume from: kill nothing, the caller's asserts say so
            time.sleep(poll_s)
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it exited while we looked
                if named in " ".join(process.cmdline()):
                    process.kill()
                    killed.append(process.pid)
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        finished.set()
        watcher.join(timeout=5)


@pytest.mark.slow
def test_a_killed_ray_worker_is_restarted_and_resumes_on_s3_storage(s3_endpoint, s3_bucket, tmp_path):
    """2 Ray Train workers at ZeRO-2 with their run storage on S3 (moto, through an explicit
    filesystem); one worker is SIGKILLed mid-run; Ray Train restarts the group, which resumes from
    the latest checkpoint and finishes with the loss curve and gradient norms of an uninterrupted
    1-worker run (2 × 4 rows = 1 × 8: the data-parallel equivalence is checked here too)."""
    import s3fs

    # Credentials in the config: the Ray cluster may have started before the moto fixture put its
    # fake ones in this process's environment, so its workers would not inherit them.
    storage = [
        f"storage.root=s3://{s3_bucket}/kdflow", f"storage.s3.endpoint_url={s3_endpoint}", "storage.s3.access_key_id=kdflow-test-key",
        "storage.s3.secret_access_key=kdflow-test-secret", "storage.s3.region=us-east-1", "distill.train.data_split=rows",
    ]
    steps = ["distill.train.max_steps=30", "distill.train.log_every=1", "distill.checkpoint_every=5"]
    local = load_config(REPO / "configs" / "tiny.yaml", [*storage, *steps, "compute.backend=local"])
    store = Store(local.storage)
    prepared, cached = stage_outputs(local, store)
    reference = distill(local.distill, local.student, prepared, cached, store, local.compute)
    on_ray = local.compute.model_copy(update={"backend": "ray", "num_workers": 2, "cpus_per_worker": 1, "num_cpus": 2, "max_failures": 1})

    bucket = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)

    def step_15_is_on_s3() -> bool:
        bucket.invalidate_cache()
        return bucket.exists(f"{s3_bucket}/kdflow/{reference.folder}/checkpoints/step-00000015")

    # Same step key as the reference (compute is not part of it): force it to train again on Ray.
    with killing_one_process("RayTrainWorker", once=step_15_is_on_s3, poll_s=0.2) as killed:
        manifest = distill(local.distill, local.student, prepared, cached, store, on_ray, force=True)
    assert killed, "no Ray Train worker of this test's cluster was killed (no step-15 checkpoint seen on S3, or no worker found)"
    assert manifest.metrics["resumed_from_step"] >= 5
    two_workers, one_worker = history(store, manifest.folder), history(store, reference.folder)
    # 2 workers × 4 rows at ZeRO-2 follow 1 worker × 8 rows, through the kill and the resume.
    saved = json.loads(store.read_bytes(f"{manifest.folder}/deepspeed_config.json"))
    assert (saved["train_batch_size"], saved["train_micro_batch_size_per_gpu"], saved["zero_optimization"]["stage"]) == (8, 4, 2)
    assert [r["step"] for r in two_workers] == list(range(1, 31)) and all(r["kd"] > 0 for r in two_workers)
    assert [r["loss"] for r in two_workers] == pytest.approx([r["loss"] for r in one_worker], rel=1e-4)
    assert [r["grad_norm"] for r in two_workers] == pytest.approx([r["grad_norm"] for r in one_worker], rel=1e-3)
    assert not bucket.exists(f"{s3_bucket}/kdflow/{manifest.folder}/checkpoints")


@pytest.mark.slow
def test_a_killed_one_worker_task_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    """A one-worker fit on Ray runs as a Ray task (`compute.single_worker: task`), not under Ray
    Train. Its process is SIGKILLed mid-run; Ray retries the task, which resumes from the latest
    checkpoint on the store and finishes with the losses of an uninterrupted run. The fit after it
    then runs in a process Ray kept, without a new one's start-up."""
    steps = ["distill.train.max_steps=30", "distill.train.log_every=1", "distill.checkpoint_every=5"]
    local = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={tmp_path}/store", *steps, "compute.backend=local"])
    store = Store(local.storage)
    prepared, cached = stage_outputs(local, store)
    reference = distill(local.distill, local.student, prepared, cached, store, local.compute)
    on_ray = local.compute.model_copy(update={"backend": "ray", "num_workers": 1, "cpus_per_worker": 1, "max_failures": 1})
    step_15_is_complete = lambda: store.exists(f"{reference.folder}/checkpoints/step-00000015/COMPLETE")  # noqa: E731
    with killing_one_process("one_worker_fit", once=step_15_is_complete) as killed:
        manifest = distill(local.distill, local.student, prepared, cached, store, on_ray, force=True)
    assert killed, "no one_worker_fit process of this test's cluster was killed (no step-15 checkpoint seen)"
    assert manifest.metrics["resumed_from_step"] >= 15
    assert [r["step"] for r in history(store, manifest.folder)] == list(range(1, 31))
    assert [r["loss"] for r in history(store, manifest.folder)] == pytest.approx([r["loss"] for r in history(store, reference.folder)], rel=1e-4)
    assert not store.exists(f"{manifest.folder}/checkpoints")
    again = distill(local.distill, local.student, prepared, cached, store, on_ray, force=True)
    assert again.timings["worker_started"] < 0, "the second fit started a new worker process instead of reusing the retried one's"
