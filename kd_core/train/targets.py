"""Where a student's teacher targets come from, batch by batch: the `TargetSource`s.

The training loop hands its source each micro-batch of an optimizer step (`batch, targets =
source(batch, student, step)`) and passes what comes back to the step module; the objectives
take one `TeacherTargets` (`kd_core/losses/targets.py`). A source may replace the batch (the
on-policy source trains on the student's own answers). `target_source` picks one per run from
the spec:

- `CachedTargets` (a spec with cache shards: `distill.teacher_source: cache`): the training stream
  already decoded the cache shard's columns into the batch through the cache codec
  (`CacheLayout.decode`); they become the batch's `TeacherTargets`.
- `OnlineTargets` (a spec with an online teacher: `teacher_source: online`): the frozen teacher,
  loaded by the task on this worker (`Task.load_online_teacher`), runs on the batch
  (`Task.online_targets`: for a language model, the same forward pass the cache stage runs,
  `kd_core.models.inference.teacher_forward`).
- `OnPolicyTargets` (`teacher_source: on_policy`): with probability `distill.on_policy.mixing`
  (GKD's λ, drawn per optimizer step from the seed and the step, so every rank and every
  micro-batch of a step agree, and a resumed run draws the same), the batch becomes the
  student's own answers to its prompts (`Task.on_policy_batch`); the online teacher then scores
  whichever batch it is.
- `NoTargets`: a model that learns from the data alone (a teacher kdflow trains, the baseline).

A new way to get targets is one more class here, the spec field that asks for it, and its case
in `target_source`.
"""

from __future__ import annotations

import random
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

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets | None]:
        """(the batch to train on, its targets) for the `student` being trained at optimizer
        `step`, on the batch's device."""
        ...


class NoTargets:
    """No teacher: the model learns from the data alone."""

    teacher = None

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], None]:
        return batch, None


class CachedTargets:
    """The cache's targets, decoded into the batch by the training stream."""

    teacher = None

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets]:
        return batch, TeacherTargets.from_batch(batch)


class OnlineTargets:
    """The teacher run on every batch, as the job's task runs it."""

    def __init__(self, teacher, spec: TrainSpec):
        self.teacher, self.spec = teacher, spec

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets]:
        return batch, self.spec.task.online_targets(self.teacher, batch, self.spec)


class OnPolicyTargets:
    """The student's own answers, scored by the online teacher (GKD's mixing: module docstring)."""

    def __init__(self, teacher, spec: TrainSpec, sampling):
        """`sampling`: what the task's `on_policy_batch` needs besides the student (its stop tokens)."""
        self.teacher, self.spec, self.sampling = teacher, spec, sampling

    def on_policy(self, step: int) -> bool:
        return random.Random(f"{self.spec.train.seed}:{step}").random() < self.spec.on_policy.mixing

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], TeacherTargets]:
        if self.on_policy(step):
            batch = self.spec.task.on_policy_batch(student, batch, self.spec, self.sampling)
        return batch, self.spec.task.online_targets(self.teacher, batch, self.spec)


def target_source(spec: TrainSpec, store: Store, runner, device: torch.device) -> TargetSource:
    """The source of `spec`'s run: the online teacher (loaded here, on this worker), the cache, or none."""
    if spec.online_teacher is not None:
        model_dir = teacher_model_dir(store, spec.online_teacher)
        teacher = spec.task.load_online_teacher(model_dir, runner, device)
        if spec.on_policy is not None:
            return OnPolicyTargets(teacher, spec, spec.task.on_policy_sampling(spec, store))
        return OnlineTargets(teacher, spec)
    if spec.cache_shards:
        return CachedTargets()
    return NoTargets()
