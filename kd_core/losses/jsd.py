"""Generalized Jensen–Shannon divergence (as in GKD, Agarwal et al., 2024).

With the mixture M = β·p_t + (1−β)·p_s (p = softmax(logits / T)), for 0 < β < 1:

    generalized_jsd = β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M)

At the endpoints the loss is defined as the KL it interpolates towards (the convention of GKD
and TRL): β = 0 gives `forward_kl` = KL(p_t ‖ p_s) and β = 1 gives `reverse_kl` = KL(p_s ‖ p_t).
β = 0.5 is the symmetric JSD, bounded by log 2.
Shapes: student_logits and teacher_logits (..., V); mask (...) bool; returns a float32 scalar.
"""

from __future__ import annotations

from functools import partial

import torch

from kd_core.losses.common import kl_terms, log_mixture, token_divergence
from kd_core.losses.forward_kl import forward_kl_per_position
from kd_core.losses.reverse_kl import reverse_kl_per_position


def generalized_jsd_per_position(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return forward_kl_per_position(student_logprobs, teacher_logprobs)
    if beta == 1:
        return reverse_kl_per_position(student_logprobs, teacher_logprobs)
    mixture = log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * kl_terms(teacher_logprobs, mixture).sum(-1) + (1 - beta) * kl_terms(student_logprobs, mixture).sum(-1)


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, vocab_size=None) -> torch.Tensor:
    return token_divergence(
        partial(generalized_jsd_per_position, beta=beta),
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        vocab_size=vocab_size,
    )
