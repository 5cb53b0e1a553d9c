"""Skew KL divergences (DistiLLM, Ko et al., 2024), p = softmax(logits / T):

    skew_forward_kl = KL(p_t ‖ α·p_t + (1−α)·p_s)
    skew_reverse_kl = KL(p_s ‖ α·p_s + (1−α)·p_t)

Mixing a little of the first distribution into the second keeps the divergence finite and its
gradients stable when the second puts near-zero mass where the first does not. α = 0 gives the
plain forward / reverse KL; α = 1 gives 0.
Shapes: student_logits and teacher_logits (..., V); mask (...) bool; returns a float32 scalar.
"""

from __future__ import annotations

from functools import partial

import torch

from kd_core.losses.common import kl_terms, log_mixture, token_divergence


def _skewed_kl(first: torch.Tensor, second: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(first ‖ α·first + (1−α)·second) per position, from log-probs."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return kl_terms(first, log_mixture(first, second, alpha)).sum(-1)


def skew_forward_kl_per_position(student_logprobs, teacher_logprobs, alpha: float = 0.1) -> torch.Tensor:
    return _skewed_kl(teacher_logprobs, student_logprobs, alpha)


def skew_reverse_kl_per_position(student_logprobs, teacher_logprobs, alpha: float = 0.1) -> torch.Tensor:
    return _skewed_kl(student_logprobs, teacher_logprobs, alpha)


def skew_forward_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, vocab_size=None):
    return token_divergence(
        partial(skew_forward_kl_per_position, alpha=alpha), student_logits, teacher_logits,
        temperature=temperature, mask=mask, vocab_size=vocab_size,
    )


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, vocab_size=None):
    return token_divergence(
        partial(skew_reverse_kl_per_position, alpha=alpha), student_logits, teacher_logits,
        temperature=temperature, mask=mask, vocab_size=vocab_size,
    )
