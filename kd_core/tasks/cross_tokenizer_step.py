"""The torch side of the cross_tokenizer task (kd_core/tasks/cross_tokenizer.py imports it when it
trains): `CrossTokenizerStep`, the trained module. The teacher kdflow trains learns next-token
cross-entropy on its own view; a student (or the no-teacher baseline) on its own view
(`kd_core/data/views.py`), plus, with teacher targets, the KD term of `distill.cross_tokenizer`
averaged over the aligned spans.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.data.alignment import SharedVocabulary, token_pieces
from kd_core.data.views import StudentView, ViewBatch, next_token_logprobs, teacher_view
from kd_core.losses import TeacherTargets
from kd_core.losses.common import log_probs, masked_mean
from kd_core.losses.cross_tokenizer import (
    DualSpaceDistillation,
    span_kl_loss,
    span_logprobs,
    uld_loss,
    uld_topk_loss,
)


def shared_vocabulary(teacher_tokenizer_dir: str | Path, student_tokenizer_dir: str | Path, teacher_size: int, student_size: int) -> SharedVocabulary:
    """The strings both tokenizers' vocabularies hold (`kd_core.data.alignment.SharedVocabulary`),
    one entry per id of each model's output (a tokenizer with gaps in its ids, or fewer ids than
    the model predicts, is cut or padded with "no shared string")."""
    from transformers import PreTrainedTokenizerFast

    teacher = PreTrainedTokenizerFast.from_pretrained(str(teacher_tokenizer_dir))
    student = PreTrainedTokenizerFast.from_pretrained(str(student_tokenizer_dir))
    return SharedVocabulary.of(fitted(token_pieces(teacher), teacher_size), fitted(token_pieces(student), student_size))


def fitted(pieces: list, size: int) -> list:
    return (pieces + [None] * size)[:size]


class CrossTokenizerStep(nn.Module):
    """`role` teacher: cross-entropy on the teacher's view. `role` student: the student's view
    (`view`), cross-entropy on it, and with targets `kd_weight` × the KD term of `method` over
    the aligned spans (`kd_core/losses/cross_tokenizer.py`):
    - `uld`: ULD at each span's first predicting position (full or top-k targets);
    - `span_kl`: KL over the shared strings with each span merged from its tokens' conditionals,
      plus ULD on the unmatched mass (needs the teacher's log-prob of its own next tokens);
    - `dskd`: dual-space KD with cross-model attention (the teacher's hidden states and output
      layer: online); its projections train with the student (and are not saved with it), the
      student's output layer only through the student-space KL, never the projector's CE."""

    def __init__(
        self, model: nn.Module, role: str, *, objective=None, view: StudentView | None = None, shared: SharedVocabulary | None = None,
        vocab_size: int | None = None, dual_space: DualSpaceDistillation | None = None, teacher_head: nn.Module | None = None,
    ):
        super().__init__()
        self.model, self.role, self.objective, self.view, self.vocab_size = model, role, objective, view, vocab_size
        self.dual_space, self.teacher_head = dual_space, teacher_head
        if shared is not None:
            self.register_buffer("teacher_shared", torch.from_numpy(shared.teacher_shared), persistent=False)
            self.register_buffer("student_shared", torch.from_numpy(shared.student_shared), persistent=False)

    def own_view(self, batch: dict[str, torch.Tensor]) -> ViewBatch:
        return teacher_view(batch) if self.role == "teacher" else self.view(batch)

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        view = self.own_view(batch)
        wants_hidden = self.dual_space is not None and targets is not None
        output = self.model(input_ids=view.input_ids, output_hidden_states=wants_hidden)
        logits = output.logits[..., : self.vocab_size]
        predicting = view.predicting()
        ce = masked_mean(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), view.input_ids[:, 1:].flatten(), reduction="none"), predicting[:, :-1].flatten())
        if targets is None or self.objective is None or self.objective.kd_weight == 0:
            return {"loss": ce if self.objective is None else self.objective.ce_weight * ce, "ce": ce.detach(), "kd": torch.zeros((), device=ce.device)}
        kd = self.distillation(batch, view, logits, output, targets)
        return {"loss": self.objective.ce_weight * ce + self.objective.kd_weight * kd, "ce": ce.detach(), "kd": kd.detach(), "spans": torch.tensor(float(len(view.spans)), device=ce.device)}

    def distillation(self, batch, view: ViewBatch, logits: torch.Tensor, output, targets: TeacherTargets) -> torch.Tensor:
        """The KD term of `self.objective.method`, averaged over the aligned spans."""
        method, temperature, spans = self.objective.method, self.objective.temperature, view.spans
        if len(spans) == 0:
            return logits.sum() * 0.0
        if method == "dskd":
            return self.dual_space_term(batch, view, logits, output, targets)
        student = log_probs(logits, temperature)
        at_student = student[spans.rows, spans.student_start]
        ids, teacher = sparse_teacher(targets, temperature)
        teacher_ids, teacher_at = ids[spans.rows, spans.teacher_start], teacher[spans.rows, spans.teacher_start]
        if method == "uld":
            return uld_loss(at_student, teacher_at) if targets.logits is not None else uld_topk_loss(at_student, teacher_at)
        # from logits (online, or a full cache: raw logits) at the loss temperature, as `teacher_at`;
        # a sparse cache's kept log-probs are at its temperature, which the config makes the loss's
        teacher_tokens = (
            next_token_logprobs(log_probs(targets.logits, temperature), batch["input_ids"].long()) if targets.logits is not None else targets.token_logprobs
        )
        teacher_span = span_logprobs(teacher_tokens.float(), spans.rows, spans.teacher_start, spans.teacher_end)
        student_span = span_logprobs(next_token_logprobs(student, view.input_ids), spans.rows, spans.student_start, spans.student_end)
        teacher_first = batch["input_ids"].long()[spans.rows, spans.teacher_start + 1]
        student_first = view.input_ids[spans.rows, spans.student_start + 1]
        return span_kl_loss(
            at_student, teacher_ids, teacher_at, self.student_shared, self.teacher_shared, student_span, teacher_span, student_first,
            teacher_first, uld_weight=self.objective.uld_weight,
        )

    def dual_space_term(self, batch, view: ViewBatch, logits: torch.Tensor, output, targets: TeacherTargets) -> torch.Tensor:
        """DSKD's terms summed (student space, teacher space, the projector's cross-entropy)."""
        embeddings = self.model.get_input_embeddings()
        student_in = embeddings(view.input_ids)
        teacher_in = targets.hidden[0]
        last = max(targets.hidden)
        terms = self.dual_space(
            student_hidden=output.hidden_states[-1], student_embeddings_in=student_in, student_embeddings_next=shifted(student_in),
            student_mask=view.predicting(), student_logits=logits, student_next_ids=shifted(view.input_ids),
            # the projector's cross-entropy trains the projections, not the student's own output layer
            student_head=lambda hidden: F.linear(hidden, self.model.get_output_embeddings().weight.detach())[..., : self.vocab_size],
            teacher_hidden=targets.hidden[last].float(), teacher_embeddings_in=teacher_in.float(), teacher_embeddings_next=shifted(teacher_in.float()),
            teacher_mask=teacher_view(batch).predicting(), teacher_logits=targets.logits, teacher_head=self.teacher_head,
            temperature=self.objective.temperature,
        )
        return terms["loss"]


def shifted(values: torch.Tensor) -> torch.Tensor:
    """Position t holds what position t + 1 held (the last keeps its own): next tokens' values."""
    return torch.cat([values[:, 1:], values[:, -1:]], dim=1)


def sparse_teacher(targets: TeacherTargets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's next-token distribution per position as (ids, log-probs) (B, T, k): its full
    distribution at `temperature` (ids 0..V-1), its cached top k, or its cached samples as their
    frequencies."""
    if targets.logits is not None:
        teacher = log_probs(targets.logits, temperature)
        return torch.arange(teacher.shape[-1], device=teacher.device).expand_as(teacher), teacher
    if targets.topk_logprobs is not None:
        return targets.topk_ids.long(), targets.topk_logprobs.float()
    counts = targets.sample_counts.float()
    frequencies = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return targets.sample_ids.long(), torch.where(frequencies > 0, frequencies.log(), -math.inf)
