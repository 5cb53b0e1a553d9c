"""Forward KL against a teacher's cached top-k distribution.

The cache keeps, for each position, the teacher's k most likely next tokens: their ids
`teacher_topk_ids` (N, k) and log-probs `teacher_topk_logprobs` (N, k), taken from the full
softmax at the cache temperature. Two ways to compare the student with them:

- `tail=True` (default; exact on the coarsened distribution). The vocabulary is split into k+1
  outcomes: each kept id, and the "tail" of every other token. The teacher's probabilities are
  p_i = exp(teacher_topk_logprobs_i) and p_tail = 1 − Σ p_i; the student's are
  q_i = softmax(student_logits / T)_i and q_tail = 1 − Σ q_i. The loss per position is

      Σ_i p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail).

  Its minimum is the student matching the teacher on the kept ids *and* leaving the teacher's
  tail mass on the other tokens. T must be the cache temperature (the log-probs are already at it).
- `tail=False` (renormalised). p̂ = softmax(teacher_topk_logprobs / T) over the kept ids (log p =
  logit − logsumexp, so dividing log-probs by T equals dividing logits), and the loss is
  Σ_i p̂_i (log p̂_i − log q_i). This pushes all of the student's mass into the top k, which hurts
  when the teacher's top k holds little mass; it allows any T from a temperature-1 cache.

Both equal `forward_kl` on full logits when k = V. Other divergences (reverse KL, JSD, ...)
compare the same k + 1 outcomes (`coarsened`). Computed in float32; entries with p = 0 (e.g.
−inf log-probs of padded slots) contribute exactly 0; averaged over positions where `mask` is
true; an all-masked input gives 0, not NaN.
"""

from __future__ import annotations

import math

import torch

from kd_core.losses.common import kl_terms, log_probs, masked_mean

_TINY = 1e-30
_LOG_TAIL_NOISE = math.log(1e-6)


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, floored at log(_TINY) so an empty tail stays finite."""
    return torch.log((-torch.expm1(log_mass.clamp_max(0))).clamp_min(_TINY))


def topk_kl_per_position(
    student_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = True,
) -> torch.Tensor:
    """The per-position loss from the student's log-probs at T (..., V); returns (...)."""
    student_at_ids = student_logprobs.gather(-1, teacher_topk_ids.long())
    teacher_logprobs = teacher_topk_logprobs.float()
    if not tail:
        teacher_logprobs = log_probs(teacher_logprobs, temperature)
        return kl_terms(teacher_logprobs, student_at_ids).sum(-1)
    teacher_tail = _log1mexp(torch.logsumexp(teacher_logprobs, dim=-1))
    student_tail = _log1mexp(torch.logsumexp(student_at_ids, dim=-1))
    head = kl_terms(teacher_logprobs, student_at_ids).sum(-1)
    # A teacher tail below float32 resolution of 1 − Σp is rounding noise, not mass.
    tail_term = torch.where(teacher_tail > _LOG_TAIL_NOISE, kl_terms(teacher_tail, student_tail), 0.0)
    return head + tail_term


def coarsened(student_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's distributions over the k + 1 outcomes of the `tail=True`
    comparison (each kept id, then the tail), as log-probs (..., k + 1), in float32: any
    divergence of two distributions applies to them (`DistillationObjective` uses the configured
    one; forward KL over them is `topk_kl_per_position` with the tail, but for its noise floor).
    The student's log-probs (..., V) are at the temperature the teacher's top-k were taken at."""
    student_at_ids = student_logprobs.gather(-1, teacher_topk_ids.long()).float()
    teacher = teacher_topk_logprobs.float()
    student_tail = _log1mexp(torch.logsumexp(student_at_ids, dim=-1, keepdim=True))
    teacher_tail = _log1mexp(torch.logsumexp(teacher, dim=-1, keepdim=True))
    return torch.cat([student_at_ids, student_tail], -1), torch.cat([teacher, teacher_tail], -1)


def topk_kl(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: bool = True,
) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k ids (plus the tail bucket when `tail`).

    Shapes: student_logits (..., V); teacher_topk_logprobs and teacher_topk_ids (..., k);
    mask (...) bool or None. Returns a float32 scalar.
    """
    per_position = topk_kl_per_position(
        log_probs(student_logits, temperature), teacher_topk_logprobs, teacher_topk_ids, temperature=temperature, tail=tail
    )
    return masked_mean(per_position, mask)
