"""Forward KL, the classic distillation divergence (Hinton et al., 2015).

    forward_kl = KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v)),   p = softmax(logits / T)

Mass-covering: the student is pushed to put probability wherever the teacher does.
Shapes: student_logits and teacher_logits (..., V); mask (...) bool; returns a float32 scalar,
the mean over positions where mask is true (0 when none are).
"""

from __future__ import annotations

import torch

from kd_core.losses.common import kl_terms, token_divergence


def forward_kl_per_position(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    return kl_terms(teacher_logprobs, student_logprobs).sum(-1)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, vocab_size=None) -> torch.Tensor:
    return token_divergence(
        forward_kl_per_position, student_logits, teacher_logits, temperature=temperature, mask=mask, vocab_size=vocab_size
    )
