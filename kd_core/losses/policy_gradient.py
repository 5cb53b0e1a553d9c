"""On-policy distillation by policy gradient: the sampled-token reverse-KL advantage.

The student samples a completion y; at each completion token the teacher's and the student's
log-probs of the sampled token give a per-token reward, the negative sampled reverse KL

    A_t = log p_teacher(y_t | y_<t) − log p_sampler(y_t | y_<t)        (detached)

and the student is updated by an importance-weighted policy gradient (the form of
tinker-cookbook's and NeMo-RL's on-policy distillation):

    loss = − mean_t  ρ_t · A_t,      ρ_t = exp(log p_student(y_t) − log p_sampler(y_t))

`p_sampler` is the policy that generated y (the student's copy in the generation pool, possibly
a few steps stale); `p_student` the one being trained, whose log-probs carry the gradient. With
a fresh sampler ρ = 1 and the gradient is −A_t ∇ log p_student(y_t), whose expectation over
y_t ~ p_student is the gradient of the per-token reverse KL(p_student ‖ p_teacher) (the score
function's own expectation is 0). `reported_kl` is the batch's sampled reverse-KL estimate,
mean(−A_t), for logging.

Shapes: student_logprobs, sampler_logprobs, teacher_logprobs (...): the log-probs of the sampled
tokens (gather them from full log-probs at the sampled ids); mask (...) bool, the completion
tokens. Float32 whatever the input dtype; masked tokens never count; an all-masked batch gives 0.
"""

from __future__ import annotations

import torch

from kd_core.losses.common import masked_mean


def reverse_kl_advantage(teacher_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher − log p_sampler at the sampled tokens, float32, without gradient."""
    return (teacher_logprobs.float() - sampler_logprobs.float()).detach()


def policy_gradient_reverse_kl(
    student_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The importance-weighted policy-gradient loss of the module docstring (a float32 scalar)."""
    advantage = reverse_kl_advantage(teacher_logprobs, sampler_logprobs)
    if mask is not None:  # a masked token's value (an -inf log-prob) must not reach the product, nor its gradient, as NaN
        advantage = torch.where(mask, advantage, 0.0)
    ratio = torch.exp(student_logprobs.float() - sampler_logprobs.float().detach())
    return masked_mean(-ratio * advantage, mask)


def reported_kl(sampler_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The sampled reverse-KL estimate mean(log p_sampler − log p_teacher) over the completion tokens."""
    return masked_mean(-reverse_kl_advantage(teacher_logprobs, sampler_logprobs), mask)


def sampled_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`: (..., V) logits and (...) ids -> (...) float32."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
