"""Matryoshka embedding distillation: every prefix of the student embedding must work on its own.

For nested sizes d_1 < d_2 < ... ≤ D_s, with the student's first d coordinates s[:, :d] (N, d)
and the teacher's full embeddings t (N, D_t), each size is taught the teacher's similarity
structure (cosine-similarity matrices, which need no shared width):

    loss = Σ_d w_d · mean_ij (cos(s_i[:d], s_j[:d]) − cos(t_i, t_j))² / Σ_d w_d

Weights w_d default to 1. Float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.T


def matryoshka_distillation(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    dims: list[int],
    weights: list[float] | None = None,
) -> torch.Tensor:
    if not dims or any(d <= 0 or d > student_embeddings.shape[-1] for d in dims):
        raise ValueError(f"dims must be sizes in 1..{student_embeddings.shape[-1]}, got {dims}")
    weights = weights or [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"weights has {len(weights)} entries for {len(dims)} dims")
    target = _cosine_matrix(teacher_embeddings.detach())
    terms = [w * (_cosine_matrix(student_embeddings[:, :d]) - target).pow(2).mean() for d, w in zip(dims, weights)]
    return torch.stack(terms).sum() / sum(weights)
