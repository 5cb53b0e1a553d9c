"""What every token-level divergence shares: float32 log-probs at a temperature, vocabulary
alignment, the masked mean, and p·(log p − log q) with the 0·log 0 = 0 convention.

A divergence module supplies only its per-position math, `per_position(student_logprobs,
teacher_logprobs) -> (...)`; `token_divergence` turns it into a loss on logits, and the fused
chunked LM-head loss calls the same per-position function chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

PerPosition = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) over the last dimension, in float32 whatever the input dtype."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where mask is true; 0 (not NaN) when none are."""
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    return masked_sum(per_position, mask) / mask.sum().clamp_min(1).to(per_position.dtype)


def masked_sum(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over positions where mask is true (for losses normalised by a global token count)."""
    # where, not multiply: a masked position's value (even inf) must not leak in as 0·inf = NaN
    return per_position.sum() if mask is None else torch.where(mask, per_position, 0.0).sum()


def kl_terms(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """p (log p − log q) elementwise; exactly 0 where p = 0 (e.g. −inf padded logits)."""
    p = p_logprobs.exp()
    return p * masked_log_ratio(p, p_logprobs, q_logprobs)


def masked_log_ratio(p: torch.Tensor, p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """log p − log q where p > 0, else 0. Masking the difference before any product with p keeps a
    (−inf) − (−inf) = NaN out of both the value and the gradient of p."""
    return torch.where(p > 0, p_logprobs - q_logprobs, 0.0)


def log_mixture(a_logprobs: torch.Tensor, b_logprobs: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed stably in log space; w = 0 gives b and w = 1 gives a exactly."""
    log_weight_a = math.log(weight_a) if weight_a > 0 else -math.inf
    log_weight_b = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    # Adding (not replacing) keeps both sides in the graph: a zero weight gives a zero gradient.
    stacked = torch.stack([a_logprobs + log_weight_a, b_logprobs + log_weight_b])
    # Where both sides are −inf (padded vocabulary) logsumexp's gradient is NaN: compute it on a
    # placeholder there and put −inf back.
    empty = torch.isneginf(stacked).all(0)
    mixed = torch.logsumexp(torch.where(empty, 0.0, stacked), dim=0)
    return torch.where(empty, -math.inf, mixed)


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the last dimensions agree, explicitly.

    Equal sizes pass through. A model whose output is padded past its tokenizer (e.g. a teacher
    with 152064 logits for a 151936-token vocabulary, padding at the end) is aligned by passing
    `vocab_size`, the real vocabulary size: both sides are cut to it. Anything else is an error.
    """
    student_size, teacher_size = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if student_size != teacher_size:
            raise ValueError(
                f"student has {student_size} logits per position but the teacher has {teacher_size}; if one "
                f"output layer is padded past the shared tokenizer, pass vocab_size=<tokenizer size> to drop the padding"
            )
        return student_logits, teacher_logits
    if vocab_size > min(student_size, teacher_size):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logits given (student {student_size}, teacher {teacher_size}); "
            "the models do not share this vocabulary"
        )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def token_divergence(
    per_position: PerPosition,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    mask: torch.Tensor | None,
    vocab_size: int | None,
) -> torch.Tensor:
    """masked_mean(per_position(log_softmax(student/T), log_softmax(teacher/T))), in float32."""
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    return masked_mean(per_position(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)), mask)
