"""The training step of a tabular student, and what reads its rows (`task: tabular`).

`TabularStep` runs the MLP on a batch's `numeric` and `categorical` columns and returns the terms
of `kd_core/losses/tabular.py`: the distilled student learns from the teacher's cached prediction
of every row (synthetic rows included: their `target` is −1, or NaN for regression, so they count
for the teacher's term alone) and the labels; the no-teacher baseline and a search trial's
validation read the labels alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_core.losses import TeacherTargets
from kd_core.losses.tabular import classification_terms, regression_terms
from kd_core.models.tabular import row_inputs


class TabularStep(nn.Module):
    """The MLP and its objective (`distill.tabular`; None: the labels alone, the baseline)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        output = self.model(batch.get("numeric"), batch.get("categorical"))
        teacher = targets.predictions if targets is not None and self.objective is not None else None
        if self.model.classification:
            terms = classification_terms(output, teacher, batch["target"], temperature=self.objective.temperature if self.objective else 1.0)
        else:
            labels = (batch["target"].float() - self.model.target_mean) / self.model.target_std
            scaled = None if teacher is None else (teacher.float() - self.model.target_mean) / self.model.target_std
            terms = regression_terms(output, scaled, labels)
        if self.objective is None:
            return {"loss": terms["ce"], "ce": terms["ce"].detach(), "kd": terms["kd"]}
        loss = self.objective.kd_weight * terms["kd"] + self.objective.ce_weight * terms["ce"]
        return {"loss": loss, "ce": terms["ce"].detach(), "kd": terms["kd"].detach()}


@torch.no_grad()
def predict_rows(model, rows: dict[str, np.ndarray], batch_size: int, device) -> np.ndarray:
    """`model.predict` over the rows, batch by batch: (n, C) probabilities or (n, 1) values, float64."""
    model = model.to(device).eval()
    count = len(rows["target"])
    outputs = []
    for start in range(0, count, batch_size):
        numeric, categorical = row_inputs({name: values[start : start + batch_size] for name, values in rows.items()}, device)
        outputs.append(model.predict(numeric, categorical).cpu().double().numpy())
    return np.concatenate(outputs)


def validation_fit(model, rows: dict[str, np.ndarray], batch_size: int, device) -> dict[str, float]:
    """`val_loss` (cross-entropy to the labels, or the squared error in target standard deviations)
    and `val_score` (accuracy, or R²) of a student on validation rows."""
    predictions = predict_rows(model, rows, batch_size, device)
    labels = rows["target"].reshape(-1)
    if model.classification:
        chosen = np.clip(predictions[np.arange(len(labels)), labels.astype(int)], 1e-15, 1.0)
        return {"val_loss": float(-np.log(chosen).mean()), "val_score": float((predictions.argmax(1) == labels).mean())}
    errors = predictions.reshape(-1) - labels
    variance = float(labels.var()) or 1.0
    std = float(model.target_std)
    return {"val_loss": float((errors**2).mean() / std**2), "val_score": float(1 - (errors**2).mean() / variance)}


class CachedPredictions:
    """The cache's view of a tabular teacher: `columns(shard, batch_size, seed)` gives a shard's
    `teacher_prediction` (rows, C): the log of each class probability (−inf where it is 0), or the
    prediction (rows, 1), float32."""

    def __init__(self, teacher):
        self.teacher = teacher

    def columns(self, shard: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
        predictions = self.teacher.predict(shard.get("numeric"), shard.get("categorical"))
        if self.teacher.classification:
            with np.errstate(divide="ignore"):
                predictions = np.log(np.clip(predictions, 0.0, 1.0))
        return {"teacher_prediction": predictions.astype(np.float32)}
