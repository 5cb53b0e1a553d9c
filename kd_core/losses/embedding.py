"""Sentence-embedding distillation: a student encoder learns a teacher's embeddings.

Embeddings are rows of (N, D): the student's s (N, D_s), the teacher's t (N, D_t). Widths may
differ where only similarities are compared; the pointwise losses need one width (the objective
projects the student first). cos(a, b) = ⟨a, b⟩ / (‖a‖·‖b‖). τ > 0 is a temperature.

- `embedding_mse`:     mean over rows i of ‖s_i − t_i‖² / D                      (D_s = D_t = D)
- `embedding_cosine`:  mean over rows i of 1 − cos(s_i, t_i)                     (D_s = D_t)
- `soft_contrastive`:  contrastive between the two models, the teacher's similarities as soft
  labels (as CLIP-KD's contrastive relational distillation): each student embedding is a query
  against every teacher embedding of the batch, L_ij = cos(s_i, t_j)/τ, and its target is the
  teacher's own similarity row, Q_ij = softmax_j(cos(t_i, t_j)/τ) (the diagonal included, so each
  query's own text is the most likely key):
      loss = (1/N) Σ_i Σ_j Q_ij (log Q_ij − log softmax_j(L_i·)_j)    (D_s = D_t)
  Unlike `similarity_kl` (student rows against student rows) it pulls each student embedding
  towards the teacher's embedding of the same text and away from the others'. N = 0 gives 0.
- `unsupervised_contrastive`: the no-teacher baseline, SimCSE (Gao et al., 2021). `first` and
  `second` (N, D) embed the same N texts under two dropout masks; with L_ij = cos(a_i, b_j)/τ,
      loss = (1/N) Σ_i −log softmax_j(L_i·)_i = (1/N) Σ_i [logsumexp_j L_ij − L_ii]
  (InfoNCE, label j = i, the other rows of `second` are the negatives).
- `EmbeddingObjective`: the weighted sum of the above and of the Matryoshka and relational losses
  (`matryoshka.matryoshka_distillation`, `relational.rkd_distance`, `rkd_angle`,
  `similarity_kl`), with a learned projection D_s → D_t for the pointwise terms where widths differ.

All math in float32 whatever the input dtype; teacher inputs are detached. An empty batch gives 0
(attached to the student's graph, with a zero gradient), never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.common import kl_terms, masked_mean
from kd_core.losses.matryoshka import matryoshka_distillation
from kd_core.losses.relational import rkd_angle, rkd_distance, similarity_kl

_EPS = 1e-8


def _zero_like_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 that stays in the graph (a zero gradient, not a missing one)."""
    return embeddings.float().sum() * 0.0


def _same_width(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{what} needs one embedding width, but the student's is {student.shape[-1]} and the teacher's "
            f"{teacher.shape[-1]}; project the student first (EmbeddingObjective does) or use a similarity loss"
        )


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(N, D) each: mean over rows of ‖s − t‖² / D."""
    _same_width(student, teacher, "embedding_mse")
    return masked_mean((student.float() - teacher.float().detach()).pow(2).mean(-1), None)


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(N, D) each: mean over rows of 1 − cos(s, t)."""
    _same_width(student, teacher, "embedding_cosine")
    cosine = F.cosine_similarity(student.float(), teacher.float().detach(), dim=-1, eps=_EPS)
    return masked_mean(1 - cosine, None)


def soft_contrastive(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """(N, D) each: mean over rows of KL(teacher similarity row ‖ softmax of the student's
    similarities to the teacher's embeddings), at τ (the module docstring); 0 when N = 0."""
    _check_temperature(temperature)
    _same_width(student, teacher, "soft_contrastive")
    if len(student) == 0:
        return _zero_like_loss(student)
    teacher = F.normalize(teacher.float().detach(), dim=-1, eps=_EPS)
    target = F.log_softmax(teacher @ teacher.T / temperature, dim=-1)
    logits = F.normalize(student.float(), dim=-1, eps=_EPS) @ teacher.T / temperature
    return kl_terms(target, F.log_softmax(logits, dim=-1)).sum(-1).mean()


def unsupervised_contrastive(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """(N, D) each, two views of the same texts: SimCSE's InfoNCE, mean over rows of
    −log softmax_j(cos(first_i, second_j)/τ)_i. Both views get gradients; 0 when N = 0."""
    _check_temperature(temperature)
    _same_width(first, second, "unsupervised_contrastive")
    logits = F.normalize(first.float(), dim=-1, eps=_EPS) @ F.normalize(second.float(), dim=-1, eps=_EPS).T / temperature
    labels = torch.arange(len(first), device=logits.device)
    return masked_mean(F.cross_entropy(logits, labels, reduction="none"), None)


class EmbeddingObjective(nn.Module):
    """Σ_k w_k · term_k over the terms with w_k > 0, returned as {term: value, ..., "loss": sum}.

    Terms: "mse" and "cosine" on (P(s), t), with P = nn.Linear(D_s, D_t, bias=False) when the
    widths differ (train it with the student; `self.projection`, None otherwise); "matryoshka" on
    the prefixes `matryoshka_dims` of s (`matryoshka_weights`, default 1 each); "distance" and
    "angle" (RKD); "similarity_kl" (intra-modal, diagonal excluded, at `temperature`) and
    "contrastive" (`soft_contrastive` at `temperature`, on (P(s), t) like the pointwise terms).
    The other terms that compare rows with each other are 0 for a batch of fewer than 2 rows.
    """

    TERMS = ("mse", "cosine", "matryoshka", "distance", "angle", "similarity_kl", "contrastive")

    def __init__(
        self,
        *,
        student_dim: int,
        teacher_dim: int,
        mse_weight: float = 0.0,
        cosine_weight: float = 0.0,
        matryoshka_weight: float = 0.0,
        distance_weight: float = 0.0,
        angle_weight: float = 0.0,
        similarity_kl_weight: float = 0.0,
        contrastive_weight: float = 0.0,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        temperature: float = 0.05,
    ):
        super().__init__()
        weights = (mse_weight, cosine_weight, matryoshka_weight, distance_weight, angle_weight,
                   similarity_kl_weight, contrastive_weight)  # fmt: skip
        self.weights = {name: float(w) for name, w in zip(self.TERMS, weights)}
        self._validate(student_dim, list(matryoshka_dims or []), matryoshka_weights, temperature)
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.matryoshka_dims = list(matryoshka_dims or [])
        self.matryoshka_weights = None if matryoshka_weights is None else list(matryoshka_weights)
        self.temperature = temperature
        pointwise = self.weights["mse"] > 0 or self.weights["cosine"] > 0 or self.weights["contrastive"] > 0
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) if pointwise and student_dim != teacher_dim else None

    def _validate(self, student_dim, dims, dim_weights, temperature) -> None:
        negative = {name: w for name, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"embedding loss weights must be >= 0, got {negative}")
        if not any(self.weights.values()):
            raise ValueError(f"the embedding objective has no term to train; set a weight > 0 for one of {list(self.TERMS)}")
        if self.weights["matryoshka"] > 0:
            if not dims:
                raise ValueError("matryoshka_weight > 0 needs matryoshka_dims, the prefix sizes to train")
            if any(d < 1 or d > student_dim for d in dims):
                raise ValueError(f"matryoshka_dims must be sizes in 1..{student_dim} (the student's width), got {dims}")
            if dim_weights is not None and len(dim_weights) != len(dims):
                raise ValueError(f"matryoshka_weights has {len(dim_weights)} entries for {len(dims)} matryoshka_dims")
        if self.weights["similarity_kl"] > 0 or self.weights["contrastive"] > 0:
            _check_temperature(temperature)

    @classmethod
    def from_config(cls, config, student_dim: int, teacher_dim: int) -> EmbeddingObjective:
        """The objective an embedding-loss config section describes (read by field name)."""
        return cls(
            student_dim=student_dim,
            teacher_dim=teacher_dim,
            mse_weight=config.mse_weight,
            cosine_weight=config.cosine_weight,
            matryoshka_weight=config.matryoshka_weight,
            distance_weight=config.distance_weight,
            angle_weight=config.angle_weight,
            similarity_kl_weight=config.similarity_kl_weight,
            contrastive_weight=config.contrastive_weight,
            matryoshka_dims=config.matryoshka_dims,
            matryoshka_weights=config.matryoshka_weights,
            temperature=config.temperature,
        )

    def forward(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """student (N, student_dim), teacher (N, teacher_dim) → {term: float32 scalar, "loss": Σ w·term}."""
        if student_embeddings.shape[-1] != self.student_dim or teacher_embeddings.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"embeddings of widths {student_embeddings.shape[-1]} (student) and {teacher_embeddings.shape[-1]} "
                f"(teacher) given to an objective built for {self.student_dim} and {self.teacher_dim}"
            )
        student, teacher = student_embeddings.float(), teacher_embeddings.float().detach()
        terms = {name: self._term(name, student, teacher) for name in self.TERMS if self.weights[name] > 0}
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}

    def _term(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if name in ("mse", "cosine", "contrastive"):
            projected = student if self.projection is None else self.projection(student.to(self.projection.weight.dtype)).float()
            if name == "contrastive":
                return soft_contrastive(projected, teacher, temperature=self.temperature)
            return (embedding_mse if name == "mse" else embedding_cosine)(projected, teacher)
        if len(student) < 2:  # the relational terms compare rows with each other
            return _zero_like_loss(student)
        if name == "matryoshka":
            return matryoshka_distillation(student, teacher, self.matryoshka_dims, self.matryoshka_weights)
        if name == "distance":
            return rkd_distance(student, teacher)
        if name == "angle":
            return rkd_angle(student, teacher)
        return similarity_kl(student, student, teacher, teacher, temperature=self.temperature, exclude_diagonal=True)
