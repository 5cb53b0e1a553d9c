"""Where a student's teacher targets come from, batch by batch: the `TargetSource`s.

The training loop asks its source for each batch's targets (`targets = source(batch, student)`)
and hands them to the step with the batch; the objectives take one `TeacherTargets`
(`kd_core/losses/targets.py`). A source is chosen once per run from the spec (`target_source`):

- `CachedTargets` (`distill.teacher_source: cache`): the training stream already decoded the
  cache shard's columns into the batch through the cache codec (`CacheLayout.decode`); they
  become the batch's `TeacherTargets`.
- `OnlineTargets` (`teacher_source: online`): the frozen teacher runs on the batch, through the
  same forward pass the cache stage runs (`kd_core.models.inference.teacher_forward`), in its own
  DeepSpeed engine beside a DeepSpeed student (partitioned when the student is ZeRO-3), else as a
  replica on the student's device.
- `NoTargets`: a model that learns from the data alone (a teacher kdflow trains, the baseline).

A new way to get targets (e.g. on-policy: generate with the `student`, then score with the
teacher) is one more class here and its value of `distill.teacher_source` in `target_source`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kd_core.losses import TeacherTargets
from kd_core.manifest import Manifest
from kd_core.models import load_causal_lm
from kd_core.models.inference import teacher_forward
from kd_core.models.teacher import teacher_model_dir
from kd_core.storage import Store
from kd_core.train.deepspeed_engine import DeepSpeedRunner, TeacherEngine
from kd_core.train.spec import TrainSpec


class TargetSource(Protocol):
    teacher: nn.Module | TeacherEngine | None
    """The model this source runs on every batch, if any (its parameters are counted per rank)."""

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> TeacherTargets | None:
        """The targets of `batch` (on the batch's device) for the `student` being trained."""
        ...


class NoTargets:
    """No teacher: the model learns from the data alone."""

    teacher = None

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> None:
        return None


class CachedTargets:
    """The cache's targets, decoded into the batch by the training stream."""

    teacher = None

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> TeacherTargets:
        return TeacherTargets.from_batch(batch)


class OnlineTargets:
    """The teacher's full logits (cut to the data's vocabulary: a padded output layer's extra
    entries dropped) and the hidden layers the objective matches, computed on every batch."""

    def __init__(self, teacher: nn.Module | TeacherEngine, vocab_size: int, hidden_layers: list[int]):
        self.teacher, self.vocab_size, self.hidden_layers = teacher, vocab_size, hidden_layers

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> TeacherTargets:
        input_ids = batch["input_ids"]
        forward = teacher_forward(self.teacher, input_ids, self.hidden_layers)
        logits = forward.logits(slice(None)).unflatten(0, input_ids.shape)
        return TeacherTargets(logits=logits[..., : self.vocab_size], hidden=forward.hidden)


def target_source(spec: TrainSpec, store: Store, runner, device: torch.device) -> TargetSource:
    """The source of `spec`'s run: the online teacher (loaded here, on this worker), the cache, or none."""
    if spec.online_teacher is not None:
        return OnlineTargets(load_online_teacher(store, spec.online_teacher, runner, device), spec.vocab_size,
                             spec.task.online_teacher_layers(spec.objective))
    if spec.cache_shards:
        return CachedTargets()
    return NoTargets()


def load_online_teacher(store: Store, teacher: Manifest, runner, device) -> nn.Module | TeacherEngine:
    """The frozen online teacher: in its own DeepSpeed engine beside a DeepSpeed student
    (partitioned when the student is ZeRO-3), else a replica on the student's device."""
    model_dir = teacher_model_dir(store, teacher)
    if isinstance(runner, DeepSpeedRunner):
        return TeacherEngine(model_dir, runner.config)
    model = load_causal_lm(model_dir).to(device).eval()
    return model.requires_grad_(False)
