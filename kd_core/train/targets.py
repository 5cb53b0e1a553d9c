"""Where a student's teacher targets come from, batch by batch: the `TargetSource`s.

The training loop asks its source for each batch's targets (`targets = source(batch, student)`)
and hands them to the step with the batch; the objectives take one `TeacherTargets`
(`kd_core/losses/targets.py`). `target_source` picks one per run from the spec:

- `CachedTargets` (a spec with cache shards: `distill.teacher_source: cache`): the training stream
  already decoded the cache shard's columns into the batch through the cache codec
  (`CacheLayout.decode`); they become the batch's `TeacherTargets`.
- `OnlineTargets` (a spec with an online teacher: `teacher_source: online`): the frozen teacher,
  loaded by the task on this worker (`Task.load_online_teacher`), runs on the batch
  (`Task.online_targets`: for a language model, the same forward pass the cache stage runs,
  `kd_core.models.inference.teacher_forward`).
- `NoTargets`: a model that learns from the data alone (a teacher kdflow trains, the baseline).

A new way to get targets (e.g. on-policy: generate with the `student`, then score with the
teacher) is one more class here, the spec field that asks for it, and its case in `target_source`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kd_core.losses import TeacherTargets
from kd_core.models.teacher import teacher_model_dir
from kd_core.storage import Store
from kd_core.train.spec import TrainSpec


class TargetSource(Protocol):
    teacher: object | None
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
    """The teacher run on every batch, as the job's task runs it."""

    def __init__(self, teacher, spec: TrainSpec):
        self.teacher, self.spec = teacher, spec

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> TeacherTargets:
        return self.spec.task.online_targets(self.teacher, batch, self.spec)


def target_source(spec: TrainSpec, store: Store, runner, device: torch.device) -> TargetSource:
    """The source of `spec`'s run: the online teacher (loaded here, on this worker), the cache, or none."""
    if spec.online_teacher is not None:
        model_dir = teacher_model_dir(store, spec.online_teacher)
        return OnlineTargets(spec.task.load_online_teacher(model_dir, runner, device), spec)
    if spec.cache_shards:
        return CachedTargets()
    return NoTargets()
