"""Random-Sampling KD (Anshumann et al., ACL 2025): forward KL from tokens drawn from the teacher.

For each position the cache holds n draws x_1..x_n ~ p_t, stored as unique ids `sample_ids`
(..., m) with their counts `sample_counts` (..., m) (count 0 marks an unused slot). With the
empirical teacher distribution p̂(v) = count(v) / n and the student q = softmax(student_logits/T):

    sampled_kl = Σ_v p̂(v) (log p̂(v) − log q(v))

Its gradient with respect to the student logits, (q − p̂)/T, has expectation (q − p_t)/T: the
forward-KL gradient, unbiased for any n. As n grows, p̂ → p_t and the loss converges to
`forward_kl`. The draws must come from the teacher at the same temperature T.
Shapes: student_logits (..., V); sample_ids and sample_counts (..., m); mask (...) bool. Returns a
float32 scalar, the mean over positions where mask is true (0 when none are).
"""

from __future__ import annotations

import torch

from kd_core.losses.common import kl_terms, log_probs, masked_mean


def empirical_logprobs(sample_counts: torch.Tensor) -> torch.Tensor:
    """log(count / n) per slot; −inf for empty slots (they then contribute exactly 0)."""
    counts = sample_counts.float()
    return counts.log() - counts.sum(-1, keepdim=True).clamp_min(1).log()


def sampled_kl_per_position(student_logprobs: torch.Tensor, sample_ids: torch.Tensor, sample_counts: torch.Tensor) -> torch.Tensor:
    student_at_samples = student_logprobs.gather(-1, sample_ids.long())
    return kl_terms(empirical_logprobs(sample_counts), student_at_samples).sum(-1)


def sampled_kl(student_logits, sample_ids, sample_counts, *, temperature=1.0, mask=None) -> torch.Tensor:
    return masked_mean(sampled_kl_per_position(log_probs(student_logits, temperature), sample_ids, sample_counts), mask)


def draw_teacher_samples(teacher_logits: torch.Tensor, num_draws: int, *, temperature=1.0, generator=None):
    """n draws per position from softmax(teacher_logits / T), as (unique ids, counts), each (..., n).

    Unused slots hold id 0 with count 0. Deterministic given `generator`.
    """
    probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, num_draws, replacement=True, generator=generator).sort(-1).values
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = is_new.long().cumsum(-1) - 1  # the unique-id slot each draw falls into
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    shape = (*probs.shape[:-1], num_draws)
    return ids.reshape(shape), counts.reshape(shape)
