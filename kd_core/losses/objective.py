"""The combined distillation objective: hard-label cross-entropy plus a KD term.

    total = (1 − w) · CE(student, next tokens) + w · s · KD(teacher ‖ student at T)

where w = `kd_weight` and s = T² when `scale_by_temperature_squared` (so the KD gradient keeps
its size as T changes, Hinton et al. 2015), else 1. With w = 0 or no teacher targets it is plain
cross-entropy: the no-teacher baseline and teacher training use the same code path.
Everything is computed in float32; masked positions never count; an all-masked batch gives 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd_core.losses.common import masked_mean
from kd_core.losses.topk import topk_kl


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of predicting input_ids[:, t+1] from logits[:, t]. logits (B, T, V), input_ids (B, T)."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    )
    shifted_mask = None if mask is None else mask[:, 1:].flatten()
    return masked_mean(per_token, shifted_mask)


@dataclass(frozen=True)
class DistillationObjective:
    kd_weight: float = 0.5
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    topk_tail: bool = True

    def __call__(
        self,
        student_logits: torch.Tensor,
        input_ids: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor | None = None,
        teacher_topk_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns {'loss': total, 'ce': ..., 'kd': ...} (kd only when teacher targets are given)."""
        terms = {"ce": next_token_cross_entropy(student_logits, input_ids, mask)}
        if teacher_topk_logprobs is None or self.kd_weight == 0:
            terms["loss"] = terms["ce"]
            return terms
        terms["kd"] = topk_kl(
            student_logits,
            teacher_topk_logprobs,
            teacher_topk_ids,
            temperature=self.temperature,
            mask=mask,
            tail=self.topk_tail,
        )
        scale = self.temperature**2 if self.scale_by_temperature_squared else 1.0
        terms["loss"] = (1 - self.kd_weight) * terms["ce"] + self.kd_weight * scale * terms["kd"]
        return terms
