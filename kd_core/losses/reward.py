"""Reward-model distillation.

- `reward_mse`: pointwise, mean over valid examples of (r_s − r_t)².
- `preference_kl`: pairwise. For each (chosen, rejected) pair the teacher's preference
  probability p_t = σ((r_c^t − r_r^t)/T) is the target for the student's p_s = σ((r_c^s − r_r^s)/T):

      KL(Bern(p_t) ‖ Bern(p_s)) = p_t log(p_t/p_s) + (1 − p_t) log((1 − p_t)/(1 − p_s))

  computed with log-sigmoids (stable for large margins), averaged over valid pairs.
Shapes: (N,) score tensors and an optional (N,) bool mask. Float32; all-masked gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_core.losses.common import masked_mean


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
