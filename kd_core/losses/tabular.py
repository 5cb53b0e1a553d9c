"""The objective of a tabular student (`task: tabular`, `distill.tabular`).

Classification, with student logits s (B, C), the teacher's class log-probabilities t (B, C) (a
probability of exactly 0 is −inf: its term is 0), labels y (B,) (−1: a row without one, a
synthetic row) and temperature T:

    kd = T² · mean_b Σ_c p_T(c) (log p_T(c) − log q_T(c)),   p_T = softmax(t / T), q_T = softmax(s / T)
    ce = mean over rows with y ≥ 0 of −log softmax(s)[y]

Regression, with the student's output s (B,), the teacher's prediction t (B,) and labels y (B,)
(NaN: none), all in units of the training target's standard deviation:

    kd = mean_b (s − t)²          ce = mean over rows with a label of (s − y)²

loss = kd_weight · kd + ce_weight · ce. Float32 whatever the inputs' dtype; a term with no row to
count is 0 (not NaN). The T² keeps the KD gradient's scale independent of T (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_core.losses.common import kl_terms, log_probs, masked_mean


def classification_terms(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor | None, labels: torch.Tensor, *, temperature: float,
) -> dict[str, torch.Tensor]:
    """`kd` (0 without a teacher) and `ce` of the module docstring, float32 scalars."""
    labelled = labels.reshape(-1) >= 0
    per_row = F.cross_entropy(student_logits.float(), labels.reshape(-1).long().clamp_min(0), reduction="none")
    ce = masked_mean(per_row, labelled)
    if teacher_logprobs is None:
        return {"kd": torch.zeros((), device=student_logits.device), "ce": ce}
    teacher = log_probs(teacher_logprobs.float(), temperature)  # renormalised: the cache stores them at T = 1
    kd = kl_terms(teacher, log_probs(student_logits, temperature)).sum(-1).mean() * temperature**2
    return {"kd": kd, "ce": ce}


def regression_terms(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`kd` (0 without a teacher) and `ce` (the squared error to the label) of the module docstring."""
    student, labels = student.float().reshape(-1), labels.float().reshape(-1)
    labelled = ~torch.isnan(labels)
    ce = masked_mean((student - torch.where(labelled, labels, 0.0)) ** 2, labelled)
    kd = torch.zeros((), device=student.device) if teacher is None else ((student - teacher.float().reshape(-1)) ** 2).mean()
    return {"kd": kd, "ce": ce}
