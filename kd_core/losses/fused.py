"""Fused, chunked LM-head distillation: the loss from hidden states, never the full logits.

Inputs are the student's final hidden states `student_hidden` (N, H) and output weight
`student_weight` (V, H), and a target: the teacher's hidden states (N, H_t) and output weight
(V_t, H_t), or sparse cached targets (top-k or sampled). Rows are processed `chunk_size` at a
time: the chunk's logits (chunk, V) are formed, the per-position divergence and its gradient
with respect to those logits are taken right away, in the forward pass, and the gradient is
carried back through the output layer by two matmuls (into the chunk's rows of the hidden
states' gradient, and added into the weight's). Only one chunk's logits exist at any moment, so
peak memory is O(chunk · V + N · H + V · H) instead of O(N · V), and the backward pass only
scales the stored gradients.

The per-position math is the plain divergence's own function (`forward_kl_per_position`,
`topk_kl_per_position`, ...), so fused and unfused losses agree to float32 rounding. The
gradient with respect to the chunk's logits comes from the divergence's closed form
(`gradients.py`) when it has one (every dense divergence), else from autograd on the chunk.
Reduction happens once: per-chunk sums, divided by `num_valid_tokens` (by default the number of
true entries in `mask`; pass the global count across gradient-accumulation steps or ranks so
that 1×8 and 8×1 accumulate the same gradient), clamped to at least 1. Logits and the two
gradient matmuls run in the input dtype (bf16 on a GPU; the weight's gradient accumulates in the
weight's dtype, chunk by chunk, as a bf16 model's gradients are kept); the loss and the
gradient with respect to the logits are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd_core.losses.common import PerPosition, align_vocab, log_probs, masked_sum
from kd_core.losses.divergences import closed_form
from kd_core.losses.sampled import sampled_kl_per_position
from kd_core.losses.topk import topk_kl_per_position

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]
"""(student logits of one chunk (c, V) in float32, the chunk's row slice) -> per-position loss (c,).
One that carries a `value_and_grad` attribute, (logits, rows) -> (per-position loss (c,), its
gradient with respect to the logits (c, V)), gets its gradient from it instead of autograd."""


class DenseTeacherTarget:
    """A `ChunkLoss` that compares with the teacher's logits, formed chunk by chunk without grad;
    `value_and_grad` (when the divergence has a closed form) gives the per-position loss and its
    gradient with respect to the chunk's student logits without autograd."""

    def __init__(self, per_position: PerPosition, teacher_hidden, teacher_weight, temperature=1.0, vocab_size=None):
        self.per_position, self.teacher_hidden, self.teacher_weight = per_position, teacher_hidden, teacher_weight
        self.temperature, self.vocab_size = temperature, vocab_size
        self.closed_form = closed_form(per_position)
        self.value_and_grad = self._value_and_grad if self.closed_form is not None else None

    def _log_probs(self, student_logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher_hidden[rows] @ self.teacher_weight.T
        student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, self.vocab_size)
        return log_probs(student_logits, self.temperature), log_probs(teacher_logits, self.temperature)

    def __call__(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.per_position(*self._log_probs(student_logits, rows))

    def _value_and_grad(self, student_logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-position loss (c,), its gradient with respect to `student_logits` (c, V)), float32."""
        value, gradient = self.closed_form(*self._log_probs(student_logits, rows), self.temperature)
        if gradient.shape[-1] != student_logits.shape[-1]:  # a padded student head: no gradient past the vocabulary
            gradient = torch.nn.functional.pad(gradient, (0, student_logits.shape[-1] - gradient.shape[-1]))
        return value, gradient


def dense_teacher_target(
    per_position: PerPosition,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> DenseTeacherTarget:
    """Compare with the teacher's logits, formed chunk by chunk under no_grad."""
    return DenseTeacherTarget(per_position, teacher_hidden, teacher_weight, temperature, vocab_size)


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


@dataclass
class FusedTerm:
    """One loss term of a fused pass: Σ over its valid rows of `chunk_loss`, divided by
    `num_valid_tokens` (default: its valid rows), entering the total with `weight`. A term of
    weight 0 is computed for its value alone (logged, no gradient work)."""

    chunk_loss: ChunkLoss
    mask: torch.Tensor | None = None
    weight: float = 1.0
    num_valid_tokens: float | None = None

    def count(self, rows: int) -> float:
        """The divisor: `num_valid_tokens`, or the valid rows among `rows`; at least 1."""
        count = self.num_valid_tokens
        if count is None:
            count = rows if self.mask is None else self.mask.sum()
        return max(float(count), 1.0)


def _chunk_value_and_grad(term: FusedTerm, logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over the chunk's valid rows of the term, its gradient with respect to `logits` (c, V)),
    float32: from the term's closed form when it has one, else from autograd on the chunk."""
    valid = None if term.mask is None else term.mask[rows]
    value_and_grad = getattr(term.chunk_loss, "value_and_grad", None)
    if value_and_grad is not None:
        per_position, grad_logits = value_and_grad(logits.float(), rows)
        if valid is not None:
            grad_logits = torch.where(valid.unsqueeze(-1), grad_logits, 0.0)
        return masked_sum(per_position, valid), grad_logits
    with torch.enable_grad():
        leaf = logits.float().requires_grad_(True)
        chunk_sum = masked_sum(term.chunk_loss(leaf, rows), valid)
        (grad_logits,) = torch.autograd.grad(chunk_sum, leaf)
    return chunk_sum.detach(), grad_logits


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Returns (Σ_i scale_i · sum_i, the per-term sums); only the first output is differentiable."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, terms, scales, chunk_size):
        all_hidden, weight = student_hidden.detach(), student_weight.detach()
        grad_hidden = torch.empty_like(all_hidden)
        grad_weight = torch.zeros_like(weight)
        sums = torch.zeros(len(terms), dtype=torch.float32, device=student_hidden.device)
        for start in range(0, all_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = all_hidden[rows]
            logits = hidden @ weight.T
            grad_logits = None
            for index, (term, scale) in enumerate(zip(terms, scales)):
                if scale == 0:  # logged, not trained on (e.g. CE at ce_weight 0): its value alone
                    valid = None if term.mask is None else term.mask[rows]
                    sums[index] += masked_sum(term.chunk_loss(logits.float(), rows), valid)
                    continue
                chunk_sum, term_grad = _chunk_value_and_grad(term, logits, rows)
                sums[index] += chunk_sum
                grad_logits = term_grad.mul_(scale) if grad_logits is None else grad_logits.add_(term_grad, alpha=scale)
            if grad_logits is None:
                grad_hidden[rows] = 0
                continue
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.T, hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        total = (sums * torch.tensor(scales, dtype=torch.float32, device=sums.device)).sum()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_output, _grad_sums):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_output, torch.ones_like(grad_output)):  # a scaled loss (a weighted term)
            grad_hidden, grad_weight = grad_hidden * grad_output, grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None


def fused_lm_head_terms(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, terms: dict[str, FusedTerm], *, chunk_size: int = 1024
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Several terms from one pass over the logits: (Σ weight · term, {name: term}).

    Each chunk's logits are formed once and every term's gradient with respect to them is added
    (scaled by weight / its valid count) before the two matmuls. The total is differentiable
    (gradients for student_hidden and student_weight); the per-term values are for logging.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    counts = [term.count(student_hidden.shape[0]) for term in terms.values()]
    scales = [term.weight / count for term, count in zip(terms.values(), counts)]
    total, sums = _ChunkedLMHeadLoss.apply(student_hidden, student_weight, list(terms.values()), scales, chunk_size)
    return total, {name: sums[index] / counts[index] for index, name in enumerate(terms)}


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
    term = FusedTerm(chunk_loss, mask, 1.0, num_valid_tokens)
    return fused_lm_head_terms(student_hidden, student_weight, {"loss": term}, chunk_size=chunk_size)[0]
