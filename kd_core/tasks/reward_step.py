"""The torch side of the reward task (kd_core/tasks/reward.py imports it when it trains, caches
or validates, so that loading a job does not wait for torch).

- `RewardStep`: the trained module of a reward model: the model and its `RewardObjective`;
  `forward(batch, targets)` returns the loss terms.
- `CachedRewards`: the reward teacher as the cache stage runs it over a shard of pairs.
- `preference_fit_to_teacher`: a student's validation metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_core.eval.reward import agrees_with_teacher, score_pairs
from kd_core.losses import TeacherTargets
from kd_core.losses.reward import preference_kl
from kd_core.models.reward import text_rewards, trim_padding


class RewardStep(nn.Module):
    """A reward model and its objective: scores both responses of every pair in one forward pass
    (chosen rows first, then rejected) and returns the `RewardObjective` terms. A multimodal model
    reads the student view (`chosen_ids`, `rejected_ids`, `pixels`); a text model the teacher view
    (`text_chosen_ids`, `text_rejected_ids`). The teacher's rewards (`targets.chosen_rewards`,
    `targets.rejected_rewards`, from the cache) and `human_label` are what it learns from."""

    def __init__(self, model: nn.Module, objective, *, multimodal: bool, pad_id: int, warm_start_steps: int = 0):
        super().__init__()
        self.model, self.objective, self.multimodal, self.pad_id = model, objective, multimodal, pad_id
        self.held_at_start = ("model.text.", warm_start_steps) if multimodal and warm_start_steps else None
        """`make_optimizer` holds the language model still for the first `warm_start_steps` steps."""

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        view = "" if self.multimodal else "text_"
        ids = trim_padding(torch.cat([batch[f"{view}chosen_ids"], batch[f"{view}rejected_ids"]]), self.pad_id)
        if self.multimodal:
            rewards = self.model(input_ids=ids, pixel_values=torch.cat([batch["pixels"], batch["pixels"]]))
        else:
            rewards = self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        return self.objective(
            chosen, rejected, targets, human_label=batch["human_label"][:, 0] if "human_label" in batch else None
        )


class CachedRewards:
    """The cache's view of a reward teacher: its scores of both responses of every pair of a shard,
    from the text view."""

    def __init__(self, model, device: str, pad_id: int):
        self.model, self.device, self.pad_id = model, device, pad_id

    @torch.no_grad()
    def columns(self, shard: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """`teacher_chosen`, `teacher_rejected`: (rows, 1) float32 (no draws: `seed` is unused)."""
        scores: dict[str, list[np.ndarray]] = {"teacher_chosen": [], "teacher_rejected": []}
        for start in range(0, len(shard["text_chosen_ids"]), batch_size):
            for name, column in (("teacher_chosen", "text_chosen_ids"), ("teacher_rejected", "text_rejected_ids")):
                ids = torch.as_tensor(shard[column][start : start + batch_size], dtype=torch.long, device=self.device)
                ids = trim_padding(ids, self.pad_id)
                scores[name].append(text_rewards(self.model, ids, self.pad_id).cpu().numpy())
        return {name: np.concatenate(parts).astype(np.float32).reshape(-1, 1) for name, parts in scores.items()}


def preference_fit_to_teacher(model, pairs: dict[str, np.ndarray], batch_size: int, pad_id: int, device) -> tuple[float, float]:
    """A multimodal reward model's (mean preference KL to the teacher (nats/pair, T = 1), agreement
    with the teacher) over the pairs, which carry the teacher's rewards (`teacher_chosen`,
    `teacher_rejected`), from one scoring of the pairs. Agreement is the share of pairs on which
    both prefer the same response, as eval's `pairwise_accuracy_teacher` counts it: a side is
    preferred when its margin is > 0, so a tie counts as preferring the rejected response."""
    student = score_pairs(model, pairs, batch_size, pad_id, device, text_view=False)
    rewards = [
        np.ascontiguousarray(values, dtype=np.float32)
        for values in (student["chosen"], student["rejected"], pairs["teacher_chosen"][:, 0], pairs["teacher_rejected"][:, 0])
    ]
    kl = float(preference_kl(*(torch.from_numpy(values) for values in rewards)))
    margin, teacher_margin = rewards[0] - rewards[1], rewards[2] - rewards[3]
    return kl, float(np.mean(agrees_with_teacher(margin, teacher_margin)))
