"""The torch side of the embedding task (kd_core/tasks/embedding.py imports it when it trains,
caches or validates, so that loading a job does not wait for torch).

- `EmbeddingStep`: the trained module of a sentence encoder. A student with teacher targets
  learns `EmbeddingObjective` (`distill.embedding`) against the teacher's embeddings; without
  (the no-teacher baseline, and a teacher kdflow trains) SimCSE: each text encoded twice under
  different dropout masks, the other texts of the batch its negatives.
- `CachedEmbeddings`: the teacher encoder as the cache stage runs it over a shard of texts.
- `similarity_fit`: a student's validation metrics against the teacher's embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_core.losses import TeacherTargets
from kd_core.losses.embedding import EmbeddingObjective, unsupervised_contrastive
from kd_core.models.encoders import TextTokenizer, embed_rows, encoder_inputs


class EmbeddingStep(nn.Module):
    """A sentence encoder and what it learns: `objective` against `targets.embeddings`, or, with
    no objective or no targets, SimCSE at `simcse_temperature` (the model must train with
    dropout > 0, or the two views of a text are the same). With `tokenizer` the model reads the
    batch's text in its own tokens, not the prepared ids."""

    def __init__(self, model: nn.Module, objective: EmbeddingObjective | None, simcse_temperature: float, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.model, self.objective, self.simcse_temperature, self.tokenizer = model, objective, simcse_temperature, tokenizer

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        ids, mask = encoder_inputs(batch, self.tokenizer)
        if self.objective is not None:
            if targets is None or targets.embeddings is None:
                raise ValueError("the embedding objective needs the teacher's embeddings (teacher_embedding) in every batch; the batch has none")
            return self.objective(self.model(ids, mask), targets.embeddings)
        first, second = self.model(torch.cat([ids, ids]), torch.cat([mask, mask])).chunk(2)  # one pass, two dropout masks
        simcse = unsupervised_contrastive(first, second, temperature=self.simcse_temperature)
        return {"loss": simcse, "simcse": simcse.detach()}


class CachedEmbeddings:
    """The cache's view of a teacher encoder: its embedding of every text of a shard."""

    def __init__(self, model: nn.Module, device: str):
        self.model, self.device = model, device

    def columns(self, shard: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """`teacher_embedding`: (rows, D) float16 (no draws: `seed` is unused)."""
        return {"teacher_embedding": embed_rows(self.model, shard, batch_size, self.device).astype(np.float16)}


def similarity_fit(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int, device, tokenizer: TextTokenizer | None = None, k: int = 10) -> dict[str, float]:
    """A student's fit to the teacher on validation rows that carry its embeddings
    (`teacher_embedding`): `val_loss`, the mean squared difference of the two models' cosine
    similarities over every pair of rows (widths need not match), and `val_recall_at_10`, the
    share of each text's 10 nearest texts (by the teacher) that the student finds too."""
    from kd_core.eval.embedding_metrics import recall_at_k

    student = embed_rows(model, rows, batch_size, device, tokenizer)
    teacher = rows["teacher_embedding"].astype(np.float32)

    def cosines(x: np.ndarray) -> np.ndarray:
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T

    error = float(np.mean((cosines(student) - cosines(teacher)) ** 2))
    recall = recall_at_k(student, teacher, k=min(k, len(student) - 1)) if len(student) > 1 else 0.0
    return {"val_loss": error, "val_recall_at_10": recall}
