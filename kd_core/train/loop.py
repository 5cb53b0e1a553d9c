"""The training loop every causal LM in kdflow goes through: teacher, student and baseline.

`train_worker(spec, rank, world_size, progress)` is the code one data-parallel worker runs. Ray
Train calls it in each worker (see `ray_glue.py`); the `local` backend, tests and the GPU check
call it directly in one process. Named steps, top to bottom: setup, train step, save.

The data order is a pure function of (seed, step): each epoch is a seeded permutation of the
training rows, the global batch of step s is the next `batch_size` rows of it, and rank r takes
every world_size-th row of that batch. So the same global batch gives the same data on one worker
or many.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd_core.config import ArchitectureConfig, LossConfig, StorageConfig, TrainConfig
from kd_core.data.shards import decode_arrow, read_verified, split_shards
from kd_core.losses import DistillationObjective
from kd_core.manifest import Manifest
from kd_core.models import build_causal_lm, count_parameters, local_copy, save_model_dir, temporary_dir
from kd_core.storage import FileRecord, Store

HISTORY_NAME = "history.jsonl"


@dataclass
class TrainSpec:
    """Everything a worker needs, as plain picklable data (the storage section holds no logs)."""

    storage: StorageConfig
    architecture: ArchitectureConfig
    train: TrainConfig
    vocab_size: int
    seq_len: int
    token_shards: list[FileRecord]
    tokenizer_folder: str
    """Store-relative folder of the prep stage's tokenizer, copied beside the saved model."""
    output_folder: str
    """Store-relative folder that receives `model/` and `history.jsonl`."""
    loss: LossConfig | None = None
    """None trains on cross-entropy alone (teacher, baseline)."""
    cache_shards: list[FileRecord] = field(default_factory=list)
    """Teacher-cache shards aligned one-to-one with `token_shards` (distillation only); their
    columns (top-k or sampled targets, entropy) go into each batch under `CACHE_COLUMNS` keys."""

    @classmethod
    def from_prep(cls, prep: Manifest, store: Store, output_folder: str, architecture, train, **distillation) -> TrainSpec:
        """A spec that trains on the prep stage's training split and writes into `output_folder`."""
        return cls(
            storage=store.config,
            architecture=architecture,
            train=train,
            vocab_size=prep.details["vocab_size"],
            seq_len=prep.details["seq_len"],
            token_shards=split_shards(prep, "train"),
            tokenizer_folder=f"{prep.folder}/tokenizer",
            output_folder=output_folder,
            **distillation,
        )


# Cache column -> (batch key, dtype the loss wants). Present columns depend on the cache format.
CACHE_COLUMNS = {
    "topk_ids": ("teacher_topk_ids", np.int64),
    "topk_logprobs": ("teacher_topk_logprobs", np.float32),
    "sample_ids": ("teacher_sample_ids", np.int64),
    "sample_counts": ("teacher_sample_counts", np.int64),
    "entropy": ("teacher_entropy", np.float32),
}


class TrainingData:
    """Training rows (and aligned teacher targets) held in memory, served in a seeded order."""

    def __init__(self, store: Store, spec: TrainSpec):
        self.rows = np.concatenate([_read_column(store, r, "input_ids") for r in spec.token_shards]).astype(np.int64)
        self.targets: dict[str, np.ndarray] = {}
        if spec.cache_shards and len(spec.cache_shards) != len(spec.token_shards):
            raise ValueError(
                f"teacher cache has {len(spec.cache_shards)} shards but the training split has "
                f"{len(spec.token_shards)}; rerun the cache stage with --force"
            )
        blocks = [decode_arrow(read_verified(store, r), r.url) for r in spec.cache_shards]
        for column in blocks[0] if blocks else {}:
            values = np.concatenate([block[column] for block in blocks])
            if len(values) != len(self.rows):
                raise ValueError(f"teacher cache column {column} holds {len(values)} rows, token shards {len(self.rows)}")
            per_position = (len(values), spec.seq_len) if column == "entropy" else (len(values), spec.seq_len, -1)
            self.targets[column] = values.reshape(per_position)

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int, world_size: int) -> np.ndarray:
        first = step * batch_size
        epoch, offset = divmod(first, len(self.rows))
        order = np.random.default_rng([seed, epoch]).permutation(len(self.rows))
        if offset + batch_size > len(order):  # the batch straddles two epochs
            order = np.concatenate([order, np.random.default_rng([seed, epoch + 1]).permutation(len(self.rows))])
        return order[offset : offset + batch_size][rank::world_size]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {"input_ids": torch.from_numpy(self.rows[indices])}
        for column, values in self.targets.items():
            key, dtype = CACHE_COLUMNS[column]
            batch[key] = torch.from_numpy(values[indices].astype(dtype))
        return batch


def _read_column(store: Store, record: FileRecord, column: str) -> np.ndarray:
    return decode_arrow(read_verified(store, record), record.url)[column]


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.learning_rate,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    )
    return optimizer, schedule


def train_worker(spec: TrainSpec, rank: int = 0, world_size: int = 1, progress=None, wrap_model=None) -> dict:
    """Train one model; rank 0 saves it and returns the final metrics with the written files.

    `progress(step, metrics)` is called on rank 0 at every log step. `wrap_model` (e.g. Ray
    Train's `prepare_model`, which adds DistributedDataParallel) is applied after building.
    """
    # --- setup
    store = Store(spec.storage)
    data = TrainingData(store, spec)
    model = build_causal_lm(spec.architecture, spec.vocab_size, spec.seq_len, seed=spec.train.seed, dropout=spec.train.dropout)
    parameters = count_parameters(model)
    model = wrap_model(model) if wrap_model else model
    device = next(model.parameters()).device
    optimizer, schedule = make_optimizer(model, spec.train)
    objective = DistillationObjective(**spec.loss.model_dump()) if spec.loss else DistillationObjective(kd_weight=0.0)
    history: list[dict] = []
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    # --- train steps
    for step in range(spec.train.max_steps):
        indices = data.batch_indices(step, spec.train.batch_size, spec.train.seed, rank, world_size)
        batch = {name: tensor.to(device) for name, tensor in data.batch(indices).items()}
        terms = train_step(model, optimizer, schedule, objective, batch, spec.train.grad_clip)
        tokens_seen += batch["input_ids"].numel() * world_size
        if rank == 0 and (step % spec.train.log_every == 0 or step == spec.train.max_steps - 1):
            elapsed = time.perf_counter() - started
            record = {"step": step + 1, **terms, "lr": schedule.get_last_lr()[0], "tokens_per_s": tokens_seen / elapsed}
            history.append(record)
            if progress is not None:
                progress(step + 1, record)
    # --- save
    result = {**(history[-1] if history else {}), "parameters": parameters, "train_seconds": time.perf_counter() - started}
    if rank == 0:
        unwrapped = model.module if hasattr(model, "module") else model
        result["files"] = save_outputs(store, spec, unwrapped, history)
    return result


def train_step(model, optimizer, schedule, objective, batch, grad_clip) -> dict[str, float]:
    logits = model(input_ids=batch["input_ids"]).logits
    teacher_targets = {name: values for name, values in batch.items() if name.startswith("teacher_")}
    terms = objective(logits, batch["input_ids"], **teacher_targets)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    schedule.step()
    logged = {name: float(value.detach()) for name, value in terms.items()}
    logged["grad_norm"] = float(grad_norm)
    return logged


def save_outputs(store: Store, spec: TrainSpec, model, history: list[dict]) -> list[FileRecord]:
    """The model directory (safetensors + tokenizer) and the loss history, written atomically."""
    tokenizer_dir = local_copy(store, spec.tokenizer_folder)
    with temporary_dir("model-") as folder:
        save_model_dir(model, tokenizer_dir, Path(folder))
        records = store.upload_dir(folder, f"{spec.output_folder}/model")
    history_text = "".join(json.dumps(record) + "\n" for record in history)
    records.append(store.write_bytes(f"{spec.output_folder}/{HISTORY_NAME}", history_text.encode()))
    return records
