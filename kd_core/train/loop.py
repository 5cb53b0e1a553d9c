"""The training loop every model in kdflow goes through: teacher, student and baseline.

`train_worker(spec, rank, world_size, progress)` is the code one data-parallel worker runs. Ray
Train calls it in each worker (see `ray_glue.py`); the `local` backend, tests and the GPU check
call it directly in one process. Named steps, top to bottom: setup, train step, save.

Data streams from the shards through `kd_core.data.stream.TrainingStream` (token rows, plus the
aligned teacher-cache targets when distilling), split across ranks and DataLoader workers without
overlap, shuffled through a seeded buffer: the batches are a pure function of the seed, the world
size and the number of data workers. Each rank takes `batch_size / world_size` rows per step.
Each step's micro-batches and their teacher targets come from the run's `TargetSource`
(`kd_core/train/targets.py`: the cache's, decoded with the batch; an online teacher run on the
batch; the student's own answers, scored; or none), which reads them from the stream itself
(`source.step_batches(next_batch, student, step, count)`: the on-policy source replaces them
with the student's answers, and with `async` reads the next step's ahead) and keeps what it holds
between steps in the checkpoints.
Every `checkpoint_every` steps each rank writes its part of a checkpoint, and a run resumes from
the latest one (`kd_core/train/checkpoints.py`): the stream continues from the saved position of
each of the rank's consumers (`TrackedBatches`), reading back only what its shuffle buffers held.

A step whose loss or gradient norm is NaN or infinite on any rank is skipped by the runner (no
update); `NonFiniteSteps` counts them (`skipped_steps` in each log record) and, after more than
`train.max_nonfinite_steps` in a row, aborts every rank with `TrainingDiverged`, which names the
step and the last finite loss.

What is trained is the job's task's (`TrainSpec.task`, kd_core/tasks): it builds the role's
model and its step (the model and its objective, whose forward returns the loss terms), names the
columns the stream decodes, counts a batch's tokens and measures a student's validation metrics.
The loop is the same for every task.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from kd_core.cache import cache_shards
from kd_core.cache.format import CacheLayout
from kd_core.config import TrainConfig
from kd_core.data.shards import read_columns
from kd_core.data.stream import TrackedBatches, TrainingStream, as_served
from kd_core.errors import TrainingDiverged
from kd_core.manifest import HISTORY_NAME, ManifestError
from kd_core.models import count_parameters, temporary_dir
from kd_core.progress import say
from kd_core.storage import FileRecord, Store
from kd_core.train.checkpoints import (
    CheckpointError,
    CheckpointSink,
    StoreCheckpoints,
    load_rank_state,
    load_source_state,
    load_stream_positions,
    save_rank_state,
    save_source_state,
    save_stream_positions,
)
from kd_core.train.deepspeed_engine import DeepSpeedRunner, deepspeed_config
from kd_core.train.spec import TrainSpec
from kd_core.train.step import PlainRunner, unwrap
from kd_core.train.targets import TargetSource, target_source
from kd_core.train.tracking import MlflowLogger

RUN_STATE_NAME = "run.json"
DEEPSPEED_CONFIG_NAME = "deepspeed_config.json"


def training_stream(
    spec: TrainSpec, rank: int, world_size: int, batch_size: int | None = None, resume: dict | None = None
) -> TrainingStream:
    """This rank's endless stream of training rows (and teacher targets); with `batch_size`, of
    batches with their positions, continuing from `resume` (`TrackedBatches.state()`)."""
    return TrainingStream(
        spec.storage,
        spec.token_shards,
        cache_shards=spec.cache_shards,
        cache_layout=CacheLayout.from_dict(spec.cache_layout) if spec.cache_layout else None,
        seed=spec.train.seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=spec.train.shuffle_buffer,
        prefetch_shards=spec.train.prefetch_shards,
        split=spec.train.data_split,
        columns=(*spec.task.columns(spec.role, spec.prep_details), *(("tag_ids",) if spec.route else ())),
        batch_size=batch_size,
        resume=resume,
        more_caches={name: (cache_shards(cache), CacheLayout.from_dict(cache.details["layout"])) for name, cache in spec.more_caches.items()},
    )


def training_batches(spec: TrainSpec, rank: int, world_size: int, accumulation: int, resume: dict | None) -> TrackedBatches:
    """This rank's micro-batches, from the start or from the saved positions `resume`. Creating
    the DataLoader's iterator draws its base seed from the torch RNG: call this before restoring
    the RNG, as an uninterrupted run did before its first step."""
    workers = max(1, spec.train.data_workers)
    if resume is not None and resume.get("workers") != workers:
        raise CheckpointError(
            f"{spec.checkpoint_folder}: the checkpoint's data stream was read by {resume.get('workers')} data workers per rank and "
            f"this run has train.data_workers={spec.train.data_workers}; resume with the value it was written with, "
            "or set distill.resume=never to start over"
        )
    stream = training_stream(spec, rank, world_size, spec.train.batch_size // (world_size * accumulation), resume)
    loader = DataLoader(stream, batch_size=None, num_workers=spec.train.data_workers, collate_fn=as_served)
    return TrackedBatches(iter(loader), workers, resume)


def resume_stream(run: WorkerRun, batches: TrackedBatches, positions: dict | None, ahead: int = 0) -> None:
    """Bring a resumed rank's stream to its restored step. With saved positions it is there
    already (past the step by the `ahead` batches its target source restored, already read); a
    checkpoint without them (written by an older kdflow) is reached by replaying the stream:
    reading and dropping every batch up to the step."""
    served = run.start_step * run.accumulation + ahead
    if positions is None:
        if served:
            print(
                f"{run.spec.output_folder}: the checkpoint at step {run.start_step} holds no data-stream positions "
                "(an older kdflow wrote it): replaying the stream up to it", flush=True,
            )
            batches.replay(served)
        return
    if positions["batches"] != served:
        raise CheckpointError(
            f"{run.spec.checkpoint_folder}: the checkpoint's data-stream positions follow {positions['batches']} batches, but step "
            f"{run.start_step} at {run.accumulation} micro-batches per step (and {ahead} read ahead) is {served}; set "
            "distill.resume=never to start over"
        )


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(module: torch.nn.Module, train: TrainConfig):
    """AdamW (no decay on norms and biases) and the warmup + cosine schedule for every trainable
    parameter of `module` (the student and the objective's feature projections).

    A module may hold some of its parameters still at the start: `module.held_at_start` =
    (name prefix, steps) gives the parameters under that prefix a learning rate of 0 for the first
    `steps` optimizer steps (the schedule's own count, so a resumed run keeps it), then the
    schedule's; e.g. a multimodal reward student's language model while its image encoder warms
    up (`student.vision.warm_start_steps`). A wrapped module (DDP) is looked at through its
    wrapper: the parameters are the same."""
    inner = unwrap(module)
    prefix, held_steps = getattr(inner, "held_at_start", None) or ("", 0)
    groups = []
    for held in ((False, True) if held_steps else (False,)):
        named = [(n, p) for n, p in inner.named_parameters() if not held_steps or n.startswith(prefix) == held]
        decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
        groups += [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        return learning_rate_factor(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)

    def held_factor(step: int) -> float:
        return 0.0 if step < held_steps else factor(step)

    factors = [factor, factor] + ([held_factor, held_factor] if held_steps else [])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def train_worker(
    spec: TrainSpec, rank: int = 0, world_size: int = 1, progress=None, wrap_model=None, checkpoints: CheckpointSink | None = None,
    on_validation=None, teacher_actors: dict[str, list] | None = None,
) -> dict:
    """Train one model; rank 0 saves it and returns the final metrics with the written files.

    `progress(step, metrics)` is called on rank 0 at every log step. `wrap_model` (e.g. Ray
    Train's `prepare_model`, which adds DistributedDataParallel) is applied after building.
    Checkpoints go to `checkpoints` (Ray Train passes its own), by default straight to the store
    under `spec.checkpoint_folder`; training resumes from the latest one found there.
    `on_validation(metrics)` is called on every rank at each validation (`spec.validate_every`).
    `teacher_actors`: the driver's pools of teacher actors (one per teacher) for an on-policy run
    that asks for them (`kd_core.train.rollouts.teacher_pool`).
    """
    # --- setup
    store = Store(spec.storage)
    checkpoints = checkpoints or StoreCheckpoints(spec.storage, spec.checkpoint_folder, spec.keep_checkpoints, rank)
    accumulation = spec.deepspeed.gradient_accumulation_steps if spec.deepspeed else 1
    model = spec.task.build_model(spec)
    parameters = count_parameters(model)
    module = spec.task.make_step(spec, model, store)
    if spec.deepspeed:
        optimizer, schedule = make_optimizer(module, spec.train)
        runner = DeepSpeedRunner(module, optimizer, schedule, deepspeed_config(spec.deepspeed, spec.train, world_size))
    else:
        module = wrap_model(module) if wrap_model else module
        optimizer, schedule = make_optimizer(module, spec.train)
        runner = PlainRunner(module, optimizer, schedule, spec.train.grad_clip)
    device = runner.device if spec.deepspeed else next(module.parameters()).device
    source = target_source(spec, store, runner, device, rank, teacher_actors)
    run = WorkerRun(spec, rank, world_size, accumulation, runner, device, checkpoints, progress, on_validation=on_validation)
    try:  # the source may hold Ray actors: released however this ends
        # --- resume: restore the latest checkpoint, and the stream's positions in it
        with checkpoints.latest() as folder:
            positions = load_stream_positions(folder, rank) if folder is not None else None
            batches = training_batches(spec, rank, world_size, accumulation, positions)  # before the RNG is restored
            if folder is not None:
                run.restore(folder)
                source.restore(load_source_state(folder, rank), run.start_step)
        resume_stream(run, batches, positions, source.batches_ahead())
        started = time.perf_counter()
        if rank == 0 and spec.tracking is not None:
            run.logger = MlflowLogger(spec.tracking)
            run.logger.start(resume_run_id=run.mlflow_run_id)
        try:
            result = run.train_steps(batches, source)
        except BaseException:
            if run.logger is not None:
                run.logger.end("FAILED")
            raise
    finally:
        source.close()
    result |= {"parameters": parameters, "train_seconds": time.perf_counter() - started, "resumed_from_step": run.start_step}
    if spec.deepspeed:  # how ZeRO spread the student and the online teacher over the ranks (collective)
        result["parameters_per_rank"] = runner.parameters_per_rank(source.teacher)
    if run.logger is not None:
        run.logger.end()
        result["mlflow_run_id"] = run.logger.run_id
    result["resume_rows_read"] = batches.resume_rows_read()  # what restoring the data position read
    # --- save
    if spec.deepspeed:
        with runner.gathered_student() as student:  # every rank enters: ZeRO-3 gathers collectively
            if rank == 0:
                result["files"] = save_outputs(store, spec, student, run.history, runner.config)
    elif rank == 0:
        result["files"] = save_outputs(store, spec, runner.student(), run.history)
    return result


@dataclass
class WorkerRun:
    """One worker's training run: its steps, log records and checkpoints."""

    spec: TrainSpec
    rank: int
    world_size: int
    accumulation: int
    runner: DeepSpeedRunner | PlainRunner
    device: torch.device
    checkpoints: CheckpointSink
    progress: object = None
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    mlflow_run_id: str | None = None
    logger: MlflowLogger | None = None
    on_validation: object = None
    validation: dict = field(default_factory=dict)
    """The latest validation metrics (`{"step", "val_loss", ...}`: every metric of
    `Task.validation_metrics`), merged into the returned record."""
    validation_rows: dict[str, np.ndarray] | None = field(default=None, repr=False)
    """The validation rows' columns (and, for a reward student, the teacher's rewards), read once."""

    def train_steps(self, batches: TrackedBatches, source: TargetSource) -> dict:
        """The optimizer steps from `start_step`, `accumulation` micro-batches each; returns rank
        0's last log record."""
        spec, train = self.spec, self.spec.train
        started, tokens_seen = time.perf_counter(), 0
        module = self.runner.engine.module if spec.deepspeed else self.runner.module
        module.train()
        student = unwrap(module).model
        nonfinite = NonFiniteSteps(train.max_nonfinite_steps, spec.output_folder, self.rank)

        def next_batch() -> dict[str, torch.Tensor]:
            return {name: tensor.to(self.device) for name, tensor in next(batches).items()}
        # --- train steps
        for step in range(self.start_step, train.max_steps):
            micro_batches = source.step_batches(next_batch, student, step, self.accumulation)
            tokens_seen += sum(spec.task.batch_tokens(batch) for batch, _ in micro_batches) * self.world_size
            terms = self.runner.step(micro_batches)
            done = step + 1
            nonfinite.observe(done, terms)
            if step % train.log_every == 0 or done == train.max_steps:
                terms = _mean_across_ranks(terms | source.log_terms(), self.device)  # every rank takes part; rank 0 records
                terms = _per_teacher(terms, self.accumulation * self.world_size)
                if self.rank == 0:
                    elapsed = time.perf_counter() - started
                    record = {
                        "step": done, **terms, "skipped_steps": nonfinite.skipped,
                        "tokens_per_s": tokens_seen / elapsed, "samples_seen": done * train.batch_size,
                    }
                    self.history.append(record)
                    if self.logger is not None:
                        self.logger.log(done, record)
                    if self.progress is not None:
                        self.progress(done, record)
            if spec.validate_every and (done % spec.validate_every == 0 or done == train.max_steps):
                self.validation = {"step": done, **self.validate(module)}
                if self.on_validation is not None:
                    self.on_validation(dict(self.validation))
            if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < train.max_steps:
                self.checkpoints.save(done, lambda folder: self.write_checkpoint(folder, done, batches.state(), source.state(done)), {"step": done})
        metrics = {name: value for name, value in self.validation.items() if name != "step"}
        return (dict(self.history[-1]) if self.history else {}) | metrics

    @torch.no_grad()
    def validate(self, module) -> dict[str, float]:
        """The task's validation metrics (`val_loss` and any others) on the first `validation_rows`
        validation rows (see `TrainSpec.validate_every`), in float32; every rank computes them on
        the same rows (under ZeRO-3 the forward passes are collective)."""
        if self.spec.role != "student":
            raise ValueError(f"{self.spec.output_folder}: validation measures a student, not a {self.spec.role}")
        if self.validation_rows is None:
            self.validation_rows = self.read_validation_rows()
        model = unwrap(module).model
        batch_size = max(self.spec.train.batch_size // self.world_size, 1)
        model.eval()
        try:
            metrics = self.spec.task.validation_metrics(model, self.validation_rows, batch_size, self.spec, self.device)
            return {name: float(value) for name, value in metrics.items()}
        finally:
            model.train()

    def read_validation_rows(self) -> dict[str, np.ndarray]:
        spec, store = self.spec, Store(self.spec.storage)
        rows = read_columns(store, spec.validation_shards, spec.validation_rows)
        if not rows:
            raise ValueError(f"{spec.output_folder}: validation needs validation shards (the prep stage's val split)")
        if spec.task.validation_reads_cache():
            if not spec.validation_cache_shards:
                raise ManifestError(
                    f"{spec.output_folder}: validating this student needs the teacher's targets of the validation split, "
                    "which caches made before kdflow computed them lack: rerun the cache step (--force cache)"
                )
            rows |= read_columns(store, spec.validation_cache_shards, spec.validation_rows)
        return rows

    def write_checkpoint(self, folder: Path, step: int, stream_positions: dict, source_state=None) -> None:
        """This rank's part of the checkpoint of `step` (see `kd_core/train/checkpoints.py`)."""
        self.runner.save_state(folder, self.rank)
        save_rank_state(folder, self.rank, self.world_size, step)
        save_stream_positions(folder, self.rank, stream_positions)
        save_source_state(folder, self.rank, source_state)
        if self.rank == 0:
            (folder / HISTORY_NAME).write_text("".join(json.dumps(record) + "\n" for record in self.history))
            (folder / RUN_STATE_NAME).write_text(json.dumps({"step": step, "mlflow_run_id": self.logger.run_id if self.logger else None}))

    def restore(self, folder: Path) -> None:
        """Continue from the checkpoint in `folder`: weights, optimizer, schedule, RNG, history (the
        stream's positions are read before, by `training_batches`)."""
        step = load_rank_state(folder, self.rank, self.world_size)
        self.runner.load_state(folder)
        self.start_step = step
        if self.rank == 0:
            self.history = [json.loads(line) for line in (folder / HISTORY_NAME).read_text().splitlines() if line]
            self.mlflow_run_id = json.loads((folder / RUN_STATE_NAME).read_text()).get("mlflow_run_id")
            print(f"resuming {self.spec.output_folder} from its checkpoint at step {step}", flush=True)


class NonFiniteSteps:
    """The abort policy for non-finite steps (the runners skip them): more than `limit` in a row
    raises `TrainingDiverged` on every rank (the runners' verdict is the same on all ranks)."""

    def __init__(self, limit: int, run_name: str, rank: int):
        self.limit, self.run_name, self.rank = limit, run_name, rank
        self.section = "teacher.train" if run_name.startswith("teacher/") else "distill.train"
        """The config section of the run's training settings (its folder starts with its stage)."""
        self.in_a_row = self.skipped = 0
        self.last_finite_loss: float | None = None
        self.last_finite_step: int | None = None

    def observe(self, step: int, terms: dict[str, float]) -> None:
        """Take the runner's `nonfinite` verdict out of `terms`; count, warn or abort."""
        if not terms.pop("nonfinite", 0.0):
            self.in_a_row, self.last_finite_loss, self.last_finite_step = 0, terms["loss"], step
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.limit:
            last = (
                f"the last finite loss was {self.last_finite_loss:.4g} at step {self.last_finite_step}"
                if self.last_finite_step is not None else "no step had a finite loss"
            )
            raise TrainingDiverged(
                f"{self.run_name}: training diverged at step {step}: the loss or gradient norm was NaN or infinite "
                f"for {self.in_a_row} steps in a row ({self.section}.max_nonfinite_steps = {self.limit}); {last}. "
                f"Lower {self.section}.learning_rate, keep {self.section}.grad_clip set, or check the data and teacher targets",
                step=step, last_finite_loss=self.last_finite_loss, last_finite_step=self.last_finite_step,
            )
        if self.rank == 0:
            say(
                f"[yellow]{self.run_name}: step {step}: loss {terms['loss']:.4g}, gradient norm {terms['grad_norm']:.4g}: "
                f"not finite, update skipped ({self.in_a_row} in a row; more than {self.limit} aborts)[/yellow]"
            )


def _mean_across_ranks(terms: dict[str, float], device) -> dict[str, float]:
    """Loss terms averaged over the data-parallel ranks (each logged its own micro-batches); the
    learning rate and gradient norm are the same on every rank and pass through."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return terms
    names = [name for name in terms if name not in ("lr", "grad_norm")]
    values = torch.tensor([terms[name] for name in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return {**terms, **dict(zip(names, values.tolist()))}


def _per_teacher(terms: dict[str, float], micro_batches: int) -> dict[str, float]:
    """Several teachers' terms (`kd_<name>_sum`, `tokens_<name>`: means over the step's micro-batches
    and ranks) as each teacher's KD per token it taught (`kd_<name>`; 0 when it taught none) and
    its tokens in the step (`tokens_<name>`, summed over `micro_batches`)."""
    for key in [key for key in terms if key.startswith("kd_") and key.endswith("_sum")]:
        name = key[len("kd_") : -len("_sum")]
        total, tokens = terms.pop(key), terms[f"tokens_{name}"]
        terms[f"kd_{name}"] = total / tokens if tokens else 0.0
        terms[f"tokens_{name}"] = tokens * micro_batches
    return terms


def save_outputs(store: Store, spec: TrainSpec, model, history: list[dict], deepspeed_json: dict | None = None) -> list[FileRecord]:
    """The model directory (`Task.save_model`: safetensors and the tokenizer), the loss history and,
    for a DeepSpeed run, the DeepSpeed config it ran with; each written atomically."""
    with temporary_dir("model-") as folder:
        spec.task.save_model(model, store, spec, Path(folder))
        records = store.upload_dir(folder, f"{spec.output_folder}/model")
    history_text = "".join(json.dumps(record) + "\n" for record in history)
    records.append(store.write_bytes(f"{spec.output_folder}/{HISTORY_NAME}", history_text.encode()))
    if deepspeed_json is not None:
        records.append(store.write_bytes(f"{spec.output_folder}/{DEEPSPEED_CONFIG_NAME}", json.dumps(deepspeed_json, indent=2).encode()))
    return records
