"""Fused, chunked LM-head distillation: the loss from hidden states, never the full logits.

Inputs are the student's final hidden states `student_hidden` (N, H) and output weight
`student_weight` (V, H), and a target: the teacher's hidden states (N, H_t) and output weight
(V_t, H_t), or sparse cached targets (top-k or sampled). Rows are processed `chunk_size` at a
time: the chunk's logits (chunk, V) are formed, the per-position divergence is summed over the
chunk's valid positions, and its gradients with respect to the chunk's hidden states and the
output weight are taken right away, in the forward pass. Only one chunk's logits exist at any
moment, so peak memory is O(chunk · V + N · H + V · H) instead of O(N · V).

The per-position math is the plain divergence's own function (`forward_kl_per_position`,
`topk_kl_per_position`, ...), so fused and unfused losses agree to float32 rounding.
Reduction happens once: per-chunk sums, divided by `num_valid_tokens` (by default the number of
true entries in `mask`; pass the global count across gradient-accumulation steps or ranks so
that 1×8 and 8×1 accumulate the same gradient), clamped to at least 1. Logits are formed in the
input dtype (bf16 matmuls on a GPU) and the loss is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_core.losses.common import PerPosition, align_vocab, log_probs, masked_sum
from kd_core.losses.sampled import sampled_kl_per_position
from kd_core.losses.topk import topk_kl_per_position

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]
"""(student logits of one chunk (c, V) in float32, the chunk's row slice) -> per-position loss (c,)."""


def dense_teacher_target(
    per_position: PerPosition,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> ChunkLoss:
    """Compare with the teacher's logits, formed chunk by chunk under no_grad."""

    def chunk_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = (teacher_hidden[rows] @ teacher_weight.T).float()
        student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
        return per_position(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))

    return chunk_loss


def topk_target(teacher_topk_logprobs, teacher_topk_ids, *, temperature=1.0, tail=True) -> ChunkLoss:
    """Compare with cached top-k targets, (N, k) each (see `topk.py`)."""

    def chunk_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return topk_kl_per_position(
            log_probs(student_logits, temperature), teacher_topk_logprobs[rows], teacher_topk_ids[rows], temperature=temperature, tail=tail
        )

    return chunk_loss


def sampled_target(sample_ids, sample_counts, *, temperature=1.0) -> ChunkLoss:
    """Compare with cached Random-Sampling KD draws, (N, m) each (see `sampled.py`)."""

    def chunk_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return sampled_kl_per_position(log_probs(student_logits, temperature), sample_ids[rows], sample_counts[rows])

    return chunk_loss


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, mask, chunk_loss, chunk_size, num_valid_tokens):
        grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = student_hidden[rows].detach().requires_grad_(True)
            weight = student_weight.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = (hidden @ weight.T).float()
                chunk_sum = masked_sum(chunk_loss(logits, rows), None if mask is None else mask[rows])
                chunk_grad_hidden, chunk_grad_weight = torch.autograd.grad(chunk_sum, (hidden, weight))
            grad_hidden[rows] = chunk_grad_hidden
            grad_weight += chunk_grad_weight
            total += chunk_sum.detach()
        ctx.save_for_backward(grad_hidden / num_valid_tokens, grad_weight / num_valid_tokens)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        return total / num_valid_tokens

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype), None, None, None, None


def fused_lm_head_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    chunk_loss: ChunkLoss,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_valid_tokens: float | None = None,
) -> torch.Tensor:
    """Σ over valid rows of chunk_loss, divided by num_valid_tokens (default: valid rows here).

    student_hidden (N, H), student_weight (V, H), mask (N,) bool or None. Returns a float32 scalar
    whose backward gives gradients for student_hidden and student_weight only.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if num_valid_tokens is None:
        num_valid_tokens = float(student_hidden.shape[0] if mask is None else mask.sum())
    return _ChunkedLMHeadLoss.apply(
        student_hidden, student_weight, mask, chunk_loss, chunk_size, max(float(num_valid_tokens), 1.0)
    )

