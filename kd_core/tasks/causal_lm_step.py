"""The torch side of the causal_lm task (kd_core/tasks/causal_lm.py imports it when it trains,
caches or validates, so that loading a job does not wait for torch).

- `CausalLMStep`: the trained module of a language model: the model and its
  `DistillationObjective`; `forward(batch, targets)` returns the loss terms.
- `CachedLMTargets`: a language-model teacher as the cache stage runs it over a token shard.
- `next_token_loss`: a student's validation loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from kd_core.losses import DistillationObjective, TeacherTargets
from kd_core.models import sequence_inputs
from kd_core.models.inference import CausalLMTeacher


class CausalLMStep(nn.Module):
    """`vocab_size`: the data's vocabulary; a student whose output layer is padded past it (a
    pretrained Qwen2: more rows than tokens) has its logits, or its output weight's rows, cut to it,
    so its distribution is over real tokens only, as the teacher's targets are. None: no cut."""

    def __init__(self, model: nn.Module, objective: DistillationObjective, fused_chunk_size: int | None = None, vocab_size: int | None = None):
        super().__init__()
        self.model, self.objective, self.fused_chunk_size, self.vocab_size = model, objective, fused_chunk_size, vocab_size

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        """Loss terms of one batch of token rows (`input_ids`, the labels too; chat rows also
        `position_ids` and `loss_mask`, `sequence_inputs`). With `fused_chunk_size`, computed from
        the student's final hidden states chunk by chunk (`DistillationObjective.fused`), never
        from its full logits."""
        features = self.objective.features is not None
        input_ids = batch["input_ids"]
        inputs, counted = sequence_inputs(batch)
        if counted is not None:
            targets = dataclasses.replace(targets or TeacherTargets(), mask=counted)
        if self.fused_chunk_size:
            output = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
            weight = self.model.get_output_embeddings().weight[: self.vocab_size]
            return self.objective.fused(
                output.hidden_states[-1], weight, input_ids, targets, chunk_size=self.fused_chunk_size,
                student_hidden_states=output.hidden_states if features else None,
            )
        output = self.model(**inputs, output_hidden_states=features)
        return self.objective(output.logits[..., : self.vocab_size], input_ids, targets, student_hidden_states=output.hidden_states if features else None)


class CachedLMTargets:
    """The cache's view of a language-model teacher: a token shard's cache columns."""

    def __init__(self, teacher: CausalLMTeacher, device: str):
        self.teacher, self.device = teacher, device

    def columns(self, shard: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """`seed` seeds the draws of a sampled cache (on the teacher's device)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.teacher.columns(shard["input_ids"], batch_size, generator, shard.get("position_ids"))


def next_token_loss(model, rows: dict[str, torch.Tensor], batch_size: int, device, vocab_size: int | None = None) -> float:
    """A causal LM's mean next-token cross-entropy (nats/token, float32) over `rows` (columns
    as a batch holds them), at the positions that count (`sequence_inputs`), its logits cut to
    the data's `vocab_size` (a padded output layer's extra rows dropped; None: no cut)."""
    total, count = 0.0, 0
    for start in range(0, len(rows["input_ids"]), batch_size):
        inputs, counted = sequence_inputs({name: values[start : start + batch_size].to(device) for name, values in rows.items()})
        ids = inputs["input_ids"]
        logits = model(**inputs).logits.float()[:, :-1, :vocab_size].flatten(0, 1)
        losses = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten(), reduction="none")
        keep = torch.ones_like(losses, dtype=torch.bool) if counted is None else counted[:, :-1].flatten()
        total += float(losses[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)
