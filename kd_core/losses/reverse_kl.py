"""Reverse KL (as in MiniLLM, Gu et al., 2024).

    reverse_kl = KL(p_s ‖ p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v)),   p = softmax(logits / T)

Mode-seeking: the student is punished for mass where the teacher has little.
Shapes: student_logits and teacher_logits (..., V); mask (...) bool; returns a float32 scalar.
"""

from __future__ import annotations

import torch

from kd_core.losses.common import kl_terms, token_divergence


def reverse_kl_per_position(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    return kl_terms(student_logprobs, teacher_logprobs).sum(-1)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, vocab_size=None) -> torch.Tensor:
    return token_divergence(
        reverse_kl_per_position, student_logits, teacher_logits, temperature=temperature, mask=mask, vocab_size=vocab_size
    )
