"""The training loop every causal LM in kdflow goes through: teacher, student and baseline.

`train_worker(spec, rank, world_size, progress)` is the code one data-parallel worker runs. Ray
Train calls it in each worker (see `ray_glue.py`); the `local` backend, tests and the GPU check
call it directly in one process. Named steps, top to bottom: setup, train step, save.

Data streams from the shards through `kd_core.data.stream.TrainingStream` (token rows, plus the
aligned teacher-cache targets when distilling), split across ranks and DataLoader workers without
overlap, shuffled through a seeded buffer: the batches are a pure function of the seed, the world
size and the number of data workers. Each rank takes `batch_size / world_size` rows per step.
With `online_teacher` set, the teacher runs on every batch instead of a
cache and its full logits are the target.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kd_core.cache.format import CacheLayout
from kd_core.config import ArchitectureConfig, LossConfig, StorageConfig, TrainConfig
from kd_core.data.shards import split_shards
from kd_core.data.stream import TrainingStream, collate
from kd_core.losses import DistillationObjective
from kd_core.manifest import Manifest
from kd_core.models import build_causal_lm, count_parameters, load_causal_lm, local_copy, save_model_dir, temporary_dir
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
    """Teacher-cache shards aligned one-to-one with `token_shards` (offline distillation); their
    decoded targets go into each batch under `teacher_*` keys."""
    cache_layout: dict | None = None
    """The cache's `CacheLayout.to_dict()`, which decodes `cache_shards`."""
    online_teacher: Manifest | None = None
    """The teacher step's manifest: the teacher runs on every batch (online distillation: full
    teacher logits, no cache). Each worker fetches it from storage itself, on whatever node."""

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


def training_stream(spec: TrainSpec, rank: int, world_size: int) -> TrainingStream:
    """This rank's endless stream of training rows (and teacher targets)."""
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
    )


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, train: TrainConfig, extra: torch.nn.Module | None = None):
    """AdamW (no decay on norms and biases) and the warmup + cosine schedule. `extra` holds
    parameters trained along with the model (the objective's feature projections)."""
    named = [*model.named_parameters(), *(extra.named_parameters() if extra is not None else [])]
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n)]
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
    loader = DataLoader(
        training_stream(spec, rank, world_size),
        batch_size=spec.train.batch_size // world_size,
        num_workers=spec.train.data_workers,
        collate_fn=collate,
    )
    batches = iter(loader)
    model = build_causal_lm(spec.architecture, spec.vocab_size, spec.seq_len, seed=spec.train.seed, dropout=spec.train.dropout)
    parameters = count_parameters(model)
    model = wrap_model(model) if wrap_model else model
    device = next(model.parameters()).device
    online_teacher = _load_teacher(store, spec.online_teacher, device) if spec.online_teacher else None
    objective = make_objective(spec, online_teacher).to(device)
    optimizer, schedule = make_optimizer(model, spec.train, extra=objective)
    fused_chunk_size = spec.loss.fused_chunk_size if spec.loss and spec.loss.fused else None
    teacher_layers = sorted({layer for _, layer in spec.loss.feature_layers}) if objective.features is not None else []
    history: list[dict] = []
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    # --- train steps
    for step in range(spec.train.max_steps):
        batch = {name: tensor.to(device) for name, tensor in next(batches).items()}
        if online_teacher is not None:
            with torch.no_grad():
                output = online_teacher(input_ids=batch["input_ids"], output_hidden_states=bool(teacher_layers))
            batch["teacher_logits"] = output.logits
            batch.update({f"teacher_hidden_{layer}": output.hidden_states[layer] for layer in teacher_layers})
        terms = train_step(model, optimizer, schedule, objective, batch, spec.train.grad_clip, fused_chunk_size)
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


def make_objective(spec: TrainSpec, online_teacher) -> DistillationObjective:
    """The configured objective; cross-entropy alone when the spec has no loss (teacher, baseline)."""
    if spec.loss is None:
        return DistillationObjective(kd_weight=0.0)
    if online_teacher is not None:
        teacher_hidden_size = online_teacher.config.hidden_size
    else:
        teacher_hidden_size = (spec.cache_layout or {}).get("hidden_size") or None
    return DistillationObjective(
        **spec.loss.model_dump(exclude={"fused", "fused_chunk_size"}),
        student_hidden_size=spec.architecture.hidden_size,
        teacher_hidden_size=teacher_hidden_size,
    )


def _load_teacher(store: Store, teacher: Manifest, device) -> torch.nn.Module:
    from kd_core.train.teacher import teacher_model_dir  # teacher.py trains through this module

    return load_causal_lm(teacher_model_dir(store, teacher)).to(device).eval()


def train_step(model, optimizer, schedule, objective, batch, grad_clip, fused_chunk_size=None) -> dict[str, float]:
    """One optimizer step. With `fused_chunk_size`, the loss is computed from the student's final
    hidden states chunk by chunk (`DistillationObjective.fused`), never from its full logits."""
    hidden_prefix = "teacher_hidden_"
    teacher_targets = {name: values for name, values in batch.items() if name.startswith("teacher_") and not name.startswith(hidden_prefix)}
    features = {}
    if objective.features is not None:
        teacher_states = {int(name[len(hidden_prefix) :]): values for name, values in batch.items() if name.startswith(hidden_prefix)}
        features = {"teacher_hidden_states": teacher_states}
    unwrapped = model.module if hasattr(model, "module") else model
    if fused_chunk_size:
        output = model(input_ids=batch["input_ids"], output_hidden_states=True, logits_to_keep=1)
        weight = unwrapped.get_output_embeddings().weight
        if features:
            features["student_hidden_states"] = output.hidden_states
        terms = objective.fused(output.hidden_states[-1], weight, batch["input_ids"], chunk_size=fused_chunk_size, **teacher_targets, **features)
    else:
        output = model(input_ids=batch["input_ids"], output_hidden_states=bool(features))
        if features:
            features["student_hidden_states"] = output.hidden_states
        terms = objective(output.logits, batch["input_ids"], **teacher_targets, **features)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    _average_across_ranks(objective)  # the model's gradients are averaged by DDP; the objective's here
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    schedule.step()
    logged = {name: float(value.detach()) for name, value in terms.items()}
    logged["grad_norm"] = float(grad_norm)
    return logged


def _average_across_ranks(module: torch.nn.Module) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    for parameter in module.parameters():
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world_size


def save_outputs(store: Store, spec: TrainSpec, model, history: list[dict]) -> list[FileRecord]:
    """The model directory (safetensors + tokenizer) and the loss history, written atomically."""
    tokenizer_dir = local_copy(store, spec.tokenizer_folder)
    with temporary_dir("model-") as folder:
        save_model_dir(model, tokenizer_dir, Path(folder))
        records = store.upload_dir(folder, f"{spec.output_folder}/model")
    history_text = "".join(json.dumps(record) + "\n" for record in history)
    records.append(store.write_bytes(f"{spec.output_folder}/{HISTORY_NAME}", history_text.encode()))
    return records
