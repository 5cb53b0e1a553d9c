"""Total variation distance, p = softmax(logits / T):

    total_variation = ½ Σ_v |p_t(v) − p_s(v)|,   in [0, 1]

Symmetric and bounded; its gradient does not blow up where either distribution is near zero.
Shapes: student_logits and teacher_logits (..., V); mask (...) bool; returns a float32 scalar.
"""

from __future__ import annotations

import torch

from kd_core.losses.common import token_divergence


def total_variation_per_position(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def total_variation(student_logits, teacher_logits, *, temperature=1.0, mask=None, vocab_size=None) -> torch.Tensor:
    return token_divergence(
        total_variation_per_position, student_logits, teacher_logits, temperature=temperature, mask=mask, vocab_size=vocab_size
    )
