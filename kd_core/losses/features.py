"""Hidden-state distillation: match chosen student layers to chosen teacher layers.

For each mapped pair (student layer i, teacher layer j), with student states S_i (B, T, D_s),
teacher states T_j (B, T, D_t) and an optional learned projection P_i: D_s → D_t,

    mse:    mean over valid positions of ‖P_i(S_i) − T_j‖² / D_t
    cosine: mean over valid positions of 1 − cos(P_i(S_i), T_j)

and the loss is the mean over the mapped pairs. Float32; an all-masked batch gives 0.
Layer indices follow Hugging Face `output_hidden_states` (0 is the embedding output).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.common import masked_mean


def hidden_mse(student_states: torch.Tensor, teacher_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) each, same D; mean squared error per element, averaged over valid positions."""
    per_position = (student_states.float() - teacher_states.float()).pow(2).mean(-1)
    return masked_mean(per_position, mask)


def hidden_cosine(student_states: torch.Tensor, teacher_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) each, same D; 1 − cosine similarity, averaged over valid positions."""
    per_position = 1 - F.cosine_similarity(student_states.float(), teacher_states.float(), dim=-1, eps=1e-8)
    return masked_mean(per_position, mask)


class HiddenStateDistillation(nn.Module):
    """Learned projections (student dim → teacher dim) for each mapped layer pair, and the loss.

    layer_map: [(student_layer, teacher_layer), ...]; kind: 'mse' or 'cosine'. A projection is
    created only where the widths differ (identity otherwise); train it with the student.
    """

    def __init__(self, layer_map: list[tuple[int, int]], student_dim: int, teacher_dim: int, kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
        if not layer_map:
            raise ValueError("layer_map must name at least one (student_layer, teacher_layer) pair")
        self.layer_map = list(layer_map)
        self.loss = hidden_mse if kind == "mse" else hidden_cosine
        self.projections = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=False) if student_dim != teacher_dim else nn.Identity()
            for _ in self.layer_map
        )

    def forward(self, student_hidden_states, teacher_hidden_states, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each of the two is a sequence indexed by layer (Hugging Face `hidden_states`) or a
        mapping layer -> (B, T, D) (e.g. the layers a teacher cache stored)."""
        terms = []
        for (student_layer, teacher_layer), projection in zip(self.layer_map, self.projections):
            if not (_has_layer(student_hidden_states, student_layer) and _has_layer(teacher_hidden_states, teacher_layer)):
                raise ValueError(
                    f"layer pair ({student_layer}, {teacher_layer}) is out of range: the student has "
                    f"{_describe(student_hidden_states)}, the teacher {_describe(teacher_hidden_states)}"
                )
            projected = projection(student_hidden_states[student_layer].float())
            terms.append(self.loss(projected, teacher_hidden_states[teacher_layer].detach(), mask))
        return torch.stack(terms).mean()


def _has_layer(states, layer: int) -> bool:
    return layer in states if isinstance(states, Mapping) else 0 <= layer < len(states)


def _describe(states) -> str:
    if isinstance(states, Mapping):
        return f"hidden states of layers {sorted(states)}"
    return f"{len(states)} hidden states"
