"""The eval stage: teacher, student and baseline measured on the same held-out rows.

For each model: next-token cross-entropy (nats/token, float32) and perplexity = exp(CE), parameter
count and weight bytes. For the student and baseline: top-1 agreement with the teacher (how often
their most likely next token is the teacher's). Results go to `metrics.json` and the manifest;
`training_curves.png` shows the training curves beside the held-out perplexities.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from kd_core.config import EvalConfig
from kd_core.data.shards import load_split
from kd_core.eval.plots import read_history, training_curves_png
from kd_core.manifest import Manifest
from kd_core.models import count_parameters, load_causal_lm, local_copy
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.train.teacher import teacher_model_dir

CURVES_NAME = "training_curves.png"


def evaluate(
    config: EvalConfig,
    prep: Manifest,
    teacher: Manifest,
    student: Manifest,
    baseline: Manifest | None,
    store: Store,
    *,
    force: bool = False,
) -> Manifest:
    inputs = {"prep": prep, "teacher": teacher, "student": student, **({"baseline": baseline} if baseline else {})}
    run = StageRun(store, "eval", config, inputs=inputs, force=force)
    if run.reused:
        return run.reused
    rows = torch.from_numpy(load_split(store, prep, config.split, config.max_rows))
    model_dirs = {"teacher": teacher_model_dir(store, teacher), "student": local_copy(store, student.details["model_folder"])}
    if baseline is not None:
        model_dirs["baseline"] = local_copy(store, baseline.details["model_folder"])
    metrics: dict = {"split": config.split, "rows": len(rows), "tokens": int(rows.numel())}
    teacher_top1 = None
    with run.timed("measure"), progress_bar("eval", total=len(model_dirs) * len(rows)) as bar:
        for name, folder in model_dirs.items():
            model = load_causal_lm(folder)
            result, top1 = measure(model, rows, config.batch_size, bar.advance)
            result["parameters"] = count_parameters(model)
            result["weight_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            if teacher_top1 is None:
                teacher_top1 = top1
            else:
                result["agreement_top1"] = float((top1 == teacher_top1).float().mean())
            metrics[name] = result
    run.write_bytes("metrics.json", json.dumps(metrics, indent=2).encode())
    histories = {name: read_history(store, manifest) for name, manifest in inputs.items() if name != "prep"}
    run.write_bytes(CURVES_NAME, training_curves_png(histories, metrics))
    return run.finish(metrics=metrics)


@torch.no_grad()
def measure(model, rows: torch.Tensor, batch_size: int, advance=lambda n: None) -> tuple[dict, torch.Tensor]:
    """Mean next-token CE over all predicted positions, and the model's top-1 at every position."""
    total_nll, total_tokens, top1 = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        top1.append(logits.argmax(-1))
        advance(len(batch))
    cross_entropy = total_nll / max(total_tokens, 1)
    return {"cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy)}, torch.cat(top1)



@torch.no_grad()
def compare_with_teacher(model, teacher, rows: torch.Tensor, batch_size: int, bins: int = 15) -> dict:
    """How close a student is to its teacher, and how well calibrated, on held-out rows.

    - `kl_to_teacher`: mean over predicted positions of KL(p_teacher ‖ p_model), nats (float32).
    - `ece`: expected calibration error of next-token prediction: positions binned by the model's
      top-1 probability into `bins` equal-width bins, Σ_b (n_b / n) · |accuracy_b − confidence_b|.
    """
    kl_sum, count = 0.0, 0
    confidences, correct = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        log_q = torch.log_softmax(model(input_ids=batch).logits.float()[:, :-1], -1)
        log_p = torch.log_softmax(teacher(input_ids=batch).logits.float()[:, :-1], -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        count += log_q.shape[0] * log_q.shape[1]
        top_probability, top_id = log_q.exp().max(-1)
        confidences.append(top_probability.flatten())
        correct.append((top_id == batch[:, 1:]).flatten().float())
    confidence, accuracy = torch.cat(confidences), torch.cat(correct)
    which = (confidence * bins).long().clamp_max(bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += float(members.float().mean() * (accuracy[members].mean() - confidence[members].mean()).abs())
    return {"kl_to_teacher": kl_sum / max(count, 1), "ece": ece}
