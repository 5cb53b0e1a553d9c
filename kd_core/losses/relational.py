"""Relational distillation: match how examples relate, not the embeddings themselves.

Embeddings are rows of (N, D); student and teacher widths may differ.

- `rkd_distance` (Park et al., 2019): ψ_D(i, j) = ‖x_i − x_j‖ / μ, μ the mean distance over
  pairs i ≠ j; loss = mean over i ≠ j of Huber(ψ_D^s − ψ_D^t) (smooth L1, δ = 1).
- `rkd_angle` (Park et al., 2019): ψ_A(i, j, k) = ⟨e_ij, e_kj⟩ with e_ij = (x_i − x_j)/‖x_i − x_j‖;
  loss = mean over all triplets of Huber(ψ_A^s − ψ_A^t). O(N²·D) memory.
- `similarity_kl` (CLIP-RD's VRD/XRD): row-wise softmax of the cosine-similarity matrix
  sim(a, b)/τ; loss = mean over rows of KL(teacher row ‖ student row). Intra-modal: a and b are the
  same modality and the diagonal is excluded; cross-modal: a = images, b = texts, diagonal kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_core.losses.common import kl_terms


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    return torch.sqrt(squared.clamp_min(1e-12)) * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def rkd_distance(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    student, teacher = student_embeddings.float(), teacher_embeddings.float().detach()
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    student_d, teacher_d = _pairwise_distances(student), _pairwise_distances(teacher)
    student_d = student_d / student_d[off_diagonal].mean().clamp_min(1e-12)
    teacher_d = teacher_d / teacher_d[off_diagonal].mean().clamp_min(1e-12)
    return F.smooth_l1_loss(student_d[off_diagonal], teacher_d[off_diagonal])


def _angles(x: torch.Tensor) -> torch.Tensor:
    """(N, N, N): cosine of the angle at j between i and k, from unit difference vectors."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1)  # unit[j, i] = e_ij
    return torch.einsum("jid,jkd->jik", unit, unit)


def rkd_angle(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(_angles(student_embeddings.float()), _angles(teacher_embeddings.float().detach()))


def similarity_kl(
    student_a: torch.Tensor,
    student_b: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    *,
    temperature: float = 0.05,
    exclude_diagonal: bool = False,
) -> torch.Tensor:
    """Rows of a (N, D) against rows of b (M, D); intra-modal use passes a as b with exclude_diagonal."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def row_logprobs(a, b):
        logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
        if exclude_diagonal:
            logits = logits.masked_fill(torch.eye(*logits.shape, dtype=torch.bool, device=logits.device), float("-inf"))
        return F.log_softmax(logits, dim=-1)

    teacher = row_logprobs(teacher_a.detach(), teacher_b.detach())
    return kl_terms(teacher, row_logprobs(student_a, student_b)).sum(-1).mean()
