"""Reward-model distillation.

- `reward_mse`: pointwise, mean over valid examples of (r_s − r_t)².
- `preference_kl`: pairwise. For each (chosen, rejected) pair the teacher's preference
  probability p_t = σ((r_c^t − r_r^t)/T) is the target for the student's p_s = σ((r_c^s − r_r^s)/T):

      KL(Bern(p_t) ‖ Bern(p_s)) = p_t log(p_t/p_s) + (1 − p_t) log((1 − p_t)/(1 − p_s))

  computed with log-sigmoids (stable for large margins), averaged over valid pairs.
- `bradley_terry`: the student's margin against human labels (a logistic loss on Δ).
- `RewardObjective`: the weighted sum the reward distillation trains (`distill.reward`), against
  the teacher's rewards in a `TeacherTargets` (`chosen_rewards`, `rejected_rewards`).
Shapes: (N,) score tensors and an optional (N,) bool mask. Float32; all-masked gives 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kd_core.losses.common import masked_mean
from kd_core.losses.targets import TeacherTargets

if TYPE_CHECKING:  # kd_core.config imports the losses, never the other way round at import time
    from kd_core.config import RewardLossConfig


def reward_mse(student_scores, teacher_scores, mask=None) -> torch.Tensor:
    return masked_mean((student_scores.float() - teacher_scores.float().detach()).pow(2), mask)


def preference_kl(student_chosen, student_rejected, teacher_chosen, teacher_rejected, *, temperature=1.0, mask=None):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_margin = (teacher_chosen.float() - teacher_rejected.float()).detach() / temperature
    student_margin = (student_chosen.float() - student_rejected.float()) / temperature
    teacher_p = torch.sigmoid(teacher_margin)
    per_pair = teacher_p * (F.logsigmoid(teacher_margin) - F.logsigmoid(student_margin)) + (1 - teacher_p) * (
        F.logsigmoid(-teacher_margin) - F.logsigmoid(-student_margin)
    )
    return masked_mean(per_pair, mask)


def bradley_terry(student_chosen, student_rejected, labels, mask=None) -> torch.Tensor:
    """Bradley–Terry loss on human labels: −[y log σ(Δ) + (1 − y) log σ(−Δ)], Δ = r_c − r_r, with y =
    P(chosen preferred) in [0, 1]; pairs whose label is NaN (unlabelled) or masked do not count."""
    labels = labels.float()
    labeled = torch.isfinite(labels) if mask is None else torch.isfinite(labels) & mask
    y = torch.where(labeled, labels, torch.zeros_like(labels))
    margin = student_chosen.float() - student_rejected.float()
    return masked_mean(-(y * F.logsigmoid(margin) + (1 - y) * F.logsigmoid(-margin)), labeled)


class RewardObjective:
    """`pointwise_weight · reward_mse + pairwise_weight · preference_kl(T) + bradley_terry_weight ·
    bradley_terry`, float32; a term whose weight is 0, or whose targets the batch lacks (no
    teacher rewards: the baseline), is left out. Returns the terms, with their sum as `loss`."""

    def __init__(self, pointwise_weight=0.0, pairwise_weight=1.0, temperature=1.0, bradley_terry_weight=0.0):
        self.weights = {"pointwise": pointwise_weight, "pairwise": pairwise_weight, "bt": bradley_terry_weight}
        self.temperature = temperature

    @classmethod
    def from_config(cls, reward: RewardLossConfig) -> RewardObjective:
        """The objective `distill.reward` configures."""
        return cls(
            pointwise_weight=reward.pointwise_weight,
            pairwise_weight=reward.pairwise_weight,
            temperature=reward.temperature,
            bradley_terry_weight=reward.bradley_terry_weight,
        )

    def __call__(self, chosen, rejected, targets: TeacherTargets | None = None, *, human_label=None) -> dict[str, torch.Tensor]:
        """The student's rewards of each pair's chosen and rejected response (N,) each, against the
        teacher's (`targets.chosen_rewards`, `targets.rejected_rewards`) and the human labels (N,)."""
        terms: dict[str, torch.Tensor] = {}
        if targets is not None and targets.has_rewards():
            teacher_chosen, teacher_rejected = targets.chosen_rewards, targets.rejected_rewards
            if self.weights["pointwise"]:
                terms["pointwise"] = 0.5 * (reward_mse(chosen, teacher_chosen) + reward_mse(rejected, teacher_rejected))
            if self.weights["pairwise"]:
                terms["pairwise"] = preference_kl(chosen, rejected, teacher_chosen, teacher_rejected, temperature=self.temperature)
        if human_label is not None and self.weights["bt"]:
            terms["bt"] = bradley_terry(chosen, rejected, human_label)
        if not terms:
            raise ValueError("the reward objective has no term to train: give teacher rewards or human labels with a weight > 0")
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}
