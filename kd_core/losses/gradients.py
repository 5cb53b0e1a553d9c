"""Closed-form gradients of the token divergences with respect to the student's logits.

The fused LM-head loss needs, chunk by chunk, each position's divergence and its gradient with
respect to the chunk's student logits. Autograd gives both, but it keeps every float32
(chunk, V) intermediate of the graph alive and then replays the graph backwards. The closed
forms below give the value and the gradient from a handful of (chunk, V) tensors in one sweep.

With a = log p_s and b = log p_t (log-softmax at temperature T), p = e^a, q = e^b, and
u = ∂D/∂a (the derivative with respect to the student's log-probs taken as free variables),
the chain rule through a = log_softmax(z / T) gives, per position,

    ∂D/∂z = (u − p · Σ_v u_v) / T

where, per divergence D:

    forward_kl       Σ q (b − a)                 u = −q
    reverse_kl       Σ p (a − b)                 u = p (a − b + 1)
    generalized_jsd  β KL(q‖M) + (1−β) KL(p‖M)   u = (1−β) p (a − m),   M = βq + (1−β)p, m = log M
    skew_forward_kl  KL(q ‖ αq + (1−α)p)          u = −(1−α) q p / M,    M = αq + (1−α)p
    skew_reverse_kl  KL(p ‖ αp + (1−α)q)          u = p (a − m + 1 − α p / M),   M = αp + (1−α)q
    total_variation  ½ Σ |q − p|                 u = ½ p sign(p − q)

An entry where the student has no mass (p = 0: a −inf, padded logit) contributes nothing to
any u, as in the 0·log 0 = 0 convention of the values. Mixtures are formed in probability space
(one pass, where `log_mixture` works in log space for autograd's sake); they are used only where
one side has mass, so this is exact to rounding. Everything is float32 for float32 log-probs.
`divergences.py` pairs each with its per-position function (`DIVERGENCES`, `closed_form`).
`tests/test_divergences.py` checks values and gradients against the per-position functions and
autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_core.losses.common import masked_log_ratio

ValueAndGradient = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""(student log-probs (..., V), teacher log-probs (..., V), temperature) -> (D (...), ∂D/∂z (..., V))."""


def _through_softmax(student_probs: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """∂D/∂z from u = ∂D/∂a: (u − p Σu) / T."""
    return (u - student_probs * u.sum(-1, keepdim=True)) / temperature


def _mixture(weight_a: float, a_probs: torch.Tensor, b_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, log M) for M = w·a + (1−w)·b, formed in probability space (one pass; exact wherever
    either side has mass, which is where M is used)."""
    mixture = torch.add(a_probs * weight_a, b_probs, alpha=1 - weight_a)
    return mixture, mixture.log()


def forward_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0):
    teacher_probs = teacher_logprobs.exp()
    value = (teacher_probs * masked_log_ratio(teacher_probs, teacher_logprobs, student_logprobs)).sum(-1)
    return value, (student_logprobs.exp() - teacher_probs) / temperature


def reverse_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0):
    student_probs = student_logprobs.exp()
    log_ratio = masked_log_ratio(student_probs, student_logprobs, teacher_logprobs)
    value = (student_probs * log_ratio).sum(-1)
    # u = p (a − b + 1); the +1 cancels against p Σu, leaving p (a − b − D) / T.
    return value, student_probs * (log_ratio - value.unsqueeze(-1)) / temperature


def generalized_jsd_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0, beta=0.5):
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return forward_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature)
    if beta == 1:
        return reverse_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature)
    student_probs, teacher_probs = student_logprobs.exp(), teacher_logprobs.exp()
    _, log_mixture = _mixture(beta, teacher_probs, student_probs)
    student_to_mixture = masked_log_ratio(student_probs, student_logprobs, log_mixture)
    kl_student = (student_probs * student_to_mixture).sum(-1)
    kl_teacher = (teacher_probs * masked_log_ratio(teacher_probs, teacher_logprobs, log_mixture)).sum(-1)
    # u = (1−β) p (a − m) and Σu = (1−β) KL(p ‖ M).
    gradient = (1 - beta) * student_probs * (student_to_mixture - kl_student.unsqueeze(-1)) / temperature
    return beta * kl_teacher + (1 - beta) * kl_student, gradient


def skew_forward_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0, alpha=0.1):
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    student_probs, teacher_probs = student_logprobs.exp(), teacher_logprobs.exp()
    mixture, log_mixture = _mixture(alpha, teacher_probs, student_probs)
    value = (teacher_probs * masked_log_ratio(teacher_probs, teacher_logprobs, log_mixture)).sum(-1)
    # u = −(1−α) q p / M, 0 where neither side has mass.
    u = torch.where(mixture > 0, teacher_probs * student_probs / mixture, 0.0) * -(1 - alpha)
    return value, _through_softmax(student_probs, u, temperature)


def skew_reverse_kl_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0, alpha=0.1):
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    student_probs = student_logprobs.exp()
    mixture, log_mixture = _mixture(alpha, student_probs, teacher_logprobs.exp())
    student_to_mixture = masked_log_ratio(student_probs, student_logprobs, log_mixture)
    value = (student_probs * student_to_mixture).sum(-1)
    # u = p (a − m + 1 − α p / M); p / M ≤ 1/α where the student has mass.
    share = torch.where(student_probs > 0, student_probs / mixture, 0.0)
    u = student_probs * (student_to_mixture + 1 - alpha * share)
    return value, _through_softmax(student_probs, u, temperature)


def total_variation_value_and_grad(student_logprobs, teacher_logprobs, temperature=1.0):
    student_probs, teacher_probs = student_logprobs.exp(), teacher_logprobs.exp()
    difference = student_probs - teacher_probs
    value = 0.5 * difference.abs().sum(-1)
    return value, _through_softmax(student_probs, 0.5 * student_probs * difference.sign(), temperature)
