"""Forward KL against a teacher's cached top-k distribution.

The cache keeps, for each position, the teacher's k most likely next tokens: their ids
`teacher_topk_ids` (N, k) and log-probs `teacher_topk_logprobs` (N, k) at temperature 1. At
distillation temperature T the teacher's distribution restricted to those ids is

    p̂_i = softmax_i(teacher_topk_logprobs / T)        (renormalised over the k kept ids;
                                                         log p = logit - logsumexp, so dividing
                                                         log-probs by T equals dividing logits)

and the student's log-probs at the same ids are log q_i = log_softmax(student_logits / T)[ids].
The loss per position is  Σ_i p̂_i (log p̂_i − log q_i), averaged over positions where `mask`
is true. It equals `forward_kl` on full logits when k = V. Computed in float32; entries with
p̂_i = 0 (e.g. −inf log-probs of padded slots) contribute exactly 0; an all-masked input gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where mask is true; 0 (not NaN) when none are."""
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1)


def topk_kl(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p̂_teacher ‖ q_student) over the teacher's top-k ids.

    Shapes: student_logits (..., V); teacher_topk_logprobs and teacher_topk_ids (..., k);
    mask (...) bool or None. Returns a float32 scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student_at_ids = student_logprobs.gather(-1, teacher_topk_ids.long())
    teacher_logprobs = F.log_softmax(teacher_topk_logprobs.float() / temperature, dim=-1)
    teacher_probs = teacher_logprobs.exp()
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_logprobs - student_at_ids), 0.0)
    return masked_mean(terms.sum(-1), mask)
