"""Eval of a tabular task: the teacher, the distilled MLP and the hard-label MLP on held-out rows.

Per model, on `eval.split` (at most `eval.max_rows` rows):
- quality: accuracy, log-loss, ROC AUC, Brier score and calibration error (ECE, 15 bins), or
  RMSE, MAE and R² (`kd_core/eval/tabular_metrics.py`); `score` is the accuracy, or R²;
- fidelity to the teacher: on the held-out rows (`agreement`: the same class; `teacher_rmse`:
  regression) and on synthetic rows MUNGE makes around them (`synthetic_agreement`,
  `synthetic_teacher_rmse`; `SYNTHETIC_ROWS` rows, seeded): the teacher's decision surface
  between the data's rows, which held-out rows alone sample thinly;
- speed on this machine: `latency_ms`, the median time of one row (batch 1), and `rows_per_s` at
  batch `THROUGHPUT_BATCH` (1024) rows: the teacher as scikit-learn (or ONNX Runtime) runs it, a
  student as torch does; `latency_ms_1024`, the time of that batch;
- size: `weight_bytes` (the teacher's skops or ONNX file, a student's safetensors), a student's
  `parameters`.
The reference rows (`uniform`): always answering the training split's most common class (its
accuracy; the uniform distribution's log-loss), or its mean (R² 0).
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from kd_core.data.munge import munge
from kd_core.data.shards import read_columns, split_shards
from kd_core.data.tabular import feature_arrays
from kd_core.eval import synchronize
from kd_core.eval.tabular_metrics import agreement, calibration_bins, classification_metrics, regression_metrics, rmse
from kd_core.models import count_parameters, model_copy
from kd_core.models.tabular import WEIGHTS_NAME, load_tabular_mlp, row_inputs
from kd_core.models.tabular_teacher import load_teacher_folder
from kd_core.models.teacher import teacher_model_dir
from kd_core.progress import progress_bar

SYNTHETIC_ROWS = 2000
THROUGHPUT_BATCH = 1024
LATENCY_ROWS = 50


def measure_tables(config, prep, teacher, student, baseline, store, device: str) -> tuple[dict, dict, dict]:
    """({rows, synthetic_rows}, each model's metrics and `uniform`'s, {calibration: per-model bins}
    for the report) (module docstring)."""
    schema = prep.details["table"]
    rows = read_columns(store, split_shards(prep, config.split), config.max_rows)
    count = len(rows["target"])
    if count < 2:
        raise ValueError(f"eval: the {config.split} split holds {count} rows; raise data.{config.split}_fraction")
    synthetic = synthetic_rows(rows)
    teacher_model = load_teacher_folder(teacher_model_dir(store, teacher), schema)
    models = {"student": student, **({"baseline": baseline} if baseline is not None else {})}
    classification = schema["kind"] == "classification"
    labels = rows["target"].reshape(-1)
    scores, calibration = {}, {}
    with progress_bar("eval: models", total=1 + len(models)) as bar:
        teacher_out = teacher_model.predict(rows.get("numeric"), rows.get("categorical"))
        teacher_synthetic = teacher_model.predict(synthetic.get("numeric"), synthetic.get("categorical"))
        scores["teacher"] = quality(teacher_out, labels, classification) | timing(
            lambda part: teacher_model.predict(part.get("numeric"), part.get("categorical")), rows, "cpu"
        ) | {"weight_bytes": teacher_model.file_bytes}
        calibration["teacher"] = calibration_bins(teacher_out, labels.astype(int)) if classification else None
        bar.advance()
        for name, manifest in models.items():
            folder = model_copy(store, manifest)
            model = load_tabular_mlp(folder).to(device)
            predict = lambda part, model=model: _torch_predict(model, part, device)  # noqa: E731
            out, out_synthetic = predict(rows), predict(synthetic)
            scores[name] = quality(out, labels, classification) | fidelity(out, teacher_out, out_synthetic, teacher_synthetic, classification)
            scores[name] |= timing(predict, rows, device) | {
                "parameters": count_parameters(model), "weight_bytes": (folder / WEIGHTS_NAME).stat().st_size,
            }
            calibration[name] = calibration_bins(out, labels.astype(int)) if classification else None
            bar.advance()
    scores["uniform"] = reference_scores(prep, labels, classification)
    return {"rows": count, "synthetic_rows": len(synthetic["target"])}, scores, {"calibration": calibration, "classes": schema.get("classes")}


def _torch_predict(model, part: dict[str, np.ndarray], device) -> np.ndarray:
    import torch

    numeric, categorical = row_inputs(part, device)
    with torch.no_grad():
        return model.predict(numeric, categorical).cpu().double().numpy()


def quality(predictions: np.ndarray, labels: np.ndarray, classification: bool) -> dict[str, float]:
    if classification:
        metrics = classification_metrics(predictions, labels.astype(int))
        return metrics | {"score": metrics["accuracy"]}
    metrics = regression_metrics(predictions.reshape(-1), labels.astype(np.float64))
    return metrics | {"score": metrics["r2"]}


def fidelity(out, teacher_out, out_synthetic, teacher_synthetic, classification: bool) -> dict[str, float]:
    if classification:
        return {"agreement": agreement(out, teacher_out), "synthetic_agreement": agreement(out_synthetic, teacher_synthetic)}
    return {
        "teacher_rmse": rmse(out.reshape(-1), teacher_out.reshape(-1)),
        "synthetic_teacher_rmse": rmse(out_synthetic.reshape(-1), teacher_synthetic.reshape(-1)),
    }


def synthetic_rows(rows: dict[str, np.ndarray], count: int = SYNTHETIC_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """MUNGE rows around the held-out rows (no labels: `target` is a placeholder)."""
    made_numeric, made_categorical = munge(*feature_arrays(rows), count, seed=seed)
    made = {"target": np.zeros((count, 1), rows["target"].dtype)}
    if "numeric" in rows:
        made["numeric"] = made_numeric
    if "categorical" in rows:
        made["categorical"] = made_categorical
    return made


def timing(predict, rows: dict[str, np.ndarray], device) -> dict[str, float]:
    """`latency_ms` (median of single rows), `rows_per_s` and `latency_ms_1024` at batch
    THROUGHPUT_BATCH (rows repeated to fill it; the median of 5 after a warm-up)."""
    count = len(rows["target"])
    batch = {name: np.resize(values, (THROUGHPUT_BATCH, *values.shape[1:])) for name, values in rows.items()}
    predict(batch)  # warm-up
    batch_seconds = []
    for _ in range(5):
        synchronize(device)
        began = time.perf_counter()
        predict(batch)
        synchronize(device)
        batch_seconds.append(time.perf_counter() - began)
    singles = []
    for index in range(min(LATENCY_ROWS, count)):
        one = {name: values[index : index + 1] for name, values in rows.items()}
        synchronize(device)
        began = time.perf_counter()
        predict(one)
        synchronize(device)
        singles.append(time.perf_counter() - began)
    seconds = statistics.median(batch_seconds)
    return {"latency_ms": 1000 * statistics.median(singles), "rows_per_s": THROUGHPUT_BATCH / seconds, "latency_ms_1024": 1000 * seconds}


def reference_scores(prep, labels: np.ndarray, classification: bool) -> dict[str, float]:
    """The trivial predictor's numbers: the training split's majority class, or its mean."""
    if classification:
        share = float((labels == prep.metrics["majority_class"]).mean())
        return {"score": share, "accuracy": share, "log_loss": math.log(len(prep.details["table"]["classes"]))}
    return {"score": 0.0, "r2": 0.0}
