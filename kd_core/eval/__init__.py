"""Held-out measurements of language models: teacher, student and baseline on the same rows.

The eval stage (`kd_core/stages/eval.py`) runs the job's task's measurements and gates them;
for a language model (`task: causal_lm`) these are, per model, over every predicted position of the held-out split
(chat data: every position that predicts an assistant token, so completion-only) (float32):
- `cross_entropy` (nats/token) and `perplexity` = exp(CE);
- `kl_to_teacher`: mean KL(p_teacher ‖ p_model) (0 for the teacher);
- `agreement_top1`: how often the model's most likely next token is the teacher's, and
  `agreement_top5`: how often the teacher's most likely token is among the model's top 5;
- `ece`: expected calibration error of next-token prediction (top-1 confidence in 15
  equal-width bins), with the per-bin accuracy, confidence and count kept for
  the reliability diagram;
- `parameters` and `weight_bytes` (the safetensors on disk);
A student that did not start from random weights (`student.init: pretrained` or `from_teacher`)
is measured before distillation too (`start`: the folder, or the same cut of the teacher), so the
report shows what distillation, and fine-tuning alone (the baseline), added to it.
- `tokens_per_s` and `latency_ms`: inference speed on this machine, `throughput_batches` timed
  forward passes of `batch_size` rows after a warm-up (the device is recorded beside them).

The uniform predictor's numbers go beside them (`uniform`: cross-entropy ln V and perplexity V
for a language model; the preference KL of tied rewards for a reward model). Then `eval.gates`,
or with none the default sanity gates (`kd_core/gates.py`: beat uniform, beat the baseline), are
evaluated over these numbers, each pass or fail with the two numbers it compared. Everything goes to `metrics.json` and the manifest;
`training_curves.png` shows the training curves beside the held-out perplexities, and
`report.html` (`kd_core/eval/report.py`) is the page a person reads: verdict, gates, metrics and
plots.

Reward models (`task: reward`) are measured through the same stage with preference metrics
instead (pairwise accuracy against the teacher and the human labels, Spearman correlation with the
teacher's rewards, preference KL, calibration against the labels, size and speed:
`kd_core/eval/reward.py`); `metrics["task"]` says which set a metrics file holds, and the gates
and the registry read either the same way. `device_name` names the device speeds were taken on.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from kd_core.data.shards import read_columns, split_shards
from kd_core.eval.answers import measure_answers
from kd_core.models import count_parameters, load_causal_lm, model_copy, sequence_inputs
from kd_core.models.students import starting_model
from kd_core.models.teacher import teacher_model_dir
from kd_core.progress import progress_bar


def measure_language_models(config, prep, teacher, student, baseline, store, run, device) -> tuple[dict, dict]:
    """({rows, tokens} of the held-out split, held-out quality and speed of the teacher, student
    and baseline LMs, the greedy-answer examples). Chat data is measured on the assistant's
    tokens alone (`tokens` counts them; `completion_only`), and every model answers held-out
    prompts (`kd_core/eval/answers.py`; the examples also go to `answers.json`) when only the
    assistant's tokens are trained on (`train_on: assistant`: where an answer starts is known)."""
    columns = read_columns(store, split_shards(prep, config.split), config.max_rows)
    rows = {name: torch.from_numpy(values.astype(np.int64)) for name, values in columns.items()}
    model_dirs = {"teacher": teacher_model_dir(store, teacher), "student": model_copy(store, student)}
    if baseline is not None:
        model_dirs["baseline"] = model_copy(store, baseline)
    models = {name: load_causal_lm(folder).to(device) for name, folder in model_dirs.items()}
    start = starting_model(student.details.get("student_start", {}), store, teacher)
    if start is not None:  # the student before distillation, measured beside what it became
        models = {"teacher": models["teacher"], "start": start.to(device)} | models
    with run.timed("measure"), progress_bar("eval: quality", total=len(rows["input_ids"])) as bar:
        scores = measure_models(models, rows, config.batch_size, bar.advance, device=device)
    with run.timed("speed"), progress_bar("eval: speed", total=len(models)) as bar:
        for name, model in models.items():
            scores[name] |= inference_speed(model, rows, config.batch_size, config.throughput_batches, device)
            scores[name]["parameters"] = count_parameters(model)
            scores[name]["weight_bytes"] = (
                sum(f.stat().st_size for f in model_dirs[name].glob("*.safetensors")) if name in model_dirs else parameter_bytes(model)
            )
            bar.advance(1)
    examples = []
    if "loss_mask" in rows and config.answer_prompts and prep.details["chat"]["train_on"] == "assistant":  # else no prompt ends where an answer starts
        from transformers import AutoTokenizer

        with run.timed("answers"), progress_bar("eval: greedy answers", total=len(models)) as bar:
            tokenizer = AutoTokenizer.from_pretrained(model_dirs["student"])
            answered, examples = measure_answers(models, rows, tokenizer, config.answer_prompts, config.max_new_tokens, device, bar.advance)
        for name, answer_scores in answered.items():
            scores[name] |= answer_scores
        run.write_bytes("answers.json", json.dumps(examples, indent=2).encode())
    counted = sequence_inputs(rows)[1]
    held_out = {"rows": len(rows["input_ids"]), "tokens": int(rows["input_ids"].numel() if counted is None else counted.sum())}
    return held_out | ({"completion_only": True} if counted is not None else {}), scores, examples


def parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's unique parameters (what its safetensors would hold, without the header)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def perplexity(cross_entropy: float) -> float:
    """exp(cross-entropy); infinite for a diverged model (exp overflows a float past 709 nats), NaN for NaN."""
    return math.inf if cross_entropy > math.log(sys.float_info.max) else math.exp(cross_entropy)


class HeldOutScores:
    """One model's running sums over the held-out batches."""

    def __init__(self, bins: int):
        self.nll = self.kl = self.agree_top1 = self.agree_top5 = 0.0
        self.positions = 0
        self.bin_confidence, self.bin_correct, self.bin_count = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor, teacher_log_probs: torch.Tensor) -> None:
        """`log_probs`, `teacher_log_probs`: (N, V) float32 at N predicted positions; `targets`: (N,)."""
        self.nll += float(F.nll_loss(log_probs, targets, reduction="sum"))
        self.kl += float((teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum())
        teacher_top1 = teacher_log_probs.argmax(-1)
        top5 = log_probs.topk(min(5, log_probs.shape[-1]), dim=-1).indices
        self.agree_top1 += float((top5[:, 0] == teacher_top1).sum())
        self.agree_top5 += float((top5 == teacher_top1[:, None]).any(-1).sum())
        confidence = log_probs.gather(-1, top5[:, :1]).squeeze(-1).exp().double()
        which = (confidence * len(self.bin_count)).long().clamp_max(len(self.bin_count) - 1)
        self.bin_count += torch.bincount(which, minlength=len(self.bin_count)).double()
        self.bin_confidence += torch.bincount(which, weights=confidence, minlength=len(self.bin_count))
        self.bin_correct += torch.bincount(which, weights=(top5[:, 0] == targets).double(), minlength=len(self.bin_count))
        self.positions += len(targets)

    def result(self) -> dict:
        n = max(self.positions, 1)
        cross_entropy = self.nll / n
        filled = self.bin_count > 0
        accuracy = torch.where(filled, self.bin_correct / self.bin_count.clamp_min(1), torch.zeros_like(self.bin_count))
        confidence = torch.where(filled, self.bin_confidence / self.bin_count.clamp_min(1), torch.zeros_like(self.bin_count))
        ece = float((self.bin_count / n * (accuracy - confidence).abs()).sum())
        return {
            "cross_entropy": cross_entropy,
            "perplexity": perplexity(cross_entropy),
            "kl_to_teacher": self.kl / n,
            "agreement_top1": self.agree_top1 / n,
            "agreement_top5": self.agree_top5 / n,
            "ece": ece,
            "calibration": {"accuracy": accuracy.tolist(), "confidence": confidence.tolist(), "count": self.bin_count.long().tolist()},
        }


@torch.no_grad()
def measure_models(
    models: dict, rows: torch.Tensor | dict[str, torch.Tensor], batch_size: int, advance=lambda n: None, *, bins: int = 15, device="cpu"
) -> dict[str, dict]:
    """Held-out quality of every model in `models` (which must include "teacher"), batch by batch:
    the teacher's log-probs of a batch are computed once and compared with each model's. `rows`:
    token rows (N, T), or the columns of chat rows, measured at the positions that count
    (`sequence_inputs`: those that predict an assistant token)."""
    rows = rows if isinstance(rows, dict) else {"input_ids": rows}
    scores = {name: HeldOutScores(bins) for name in models}
    for start in range(0, len(rows["input_ids"]), batch_size):
        inputs, counted = sequence_inputs({name: values[start : start + batch_size].to(device) for name, values in rows.items()})
        batch = inputs["input_ids"]
        keep = None if counted is None else counted[:, :-1].flatten()
        targets = batch[:, 1:].flatten() if keep is None else batch[:, 1:].flatten()[keep]
        vocab = None
        log_probs = {}
        for name, model in models.items():
            logits = model(**inputs).logits.float()[:, :-1].flatten(0, 1)
            logits = logits if keep is None else logits[keep]
            vocab = logits.shape[-1] if vocab is None else min(vocab, logits.shape[-1])
            log_probs[name] = logits
        # A teacher whose output layer is padded beyond the data's vocabulary is cut to it.
        log_probs = {name: torch.log_softmax(logits[:, :vocab], -1) for name, logits in log_probs.items()}
        for name in models:
            scores[name].add(log_probs[name], targets, log_probs["teacher"])
        advance(len(batch))
    return {name: score.result() for name, score in scores.items()}


@torch.no_grad()
def inference_speed(model, rows: torch.Tensor | dict[str, torch.Tensor], batch_size: int, batches: int, device="cpu") -> dict:
    """Forward-pass throughput and latency on this machine: one warm-up pass, then `batches`
    timed passes of `batch_size` held-out rows (cycling through the split); tokens/s counts
    every token of the rows."""
    rows = rows if isinstance(rows, dict) else {"input_ids": rows}
    inputs = sequence_inputs({name: values[:batch_size].to(device) for name, values in rows.items()})[0]
    model(**inputs)
    times = []
    for index in range(batches):
        start = (index * batch_size) % max(len(rows["input_ids"]) - batch_size + 1, 1)
        inputs = sequence_inputs({name: values[start : start + batch_size].to(device) for name, values in rows.items()})[0]
        batch = inputs["input_ids"]
        synchronize(device)
        began = time.perf_counter()
        model(**inputs)
        synchronize(device)
        times.append(time.perf_counter() - began)
    tokens = batch.numel()
    return {"tokens_per_s": tokens * len(times) / sum(times), "latency_ms": 1000 * statistics.median(times), "latency_batch_rows": int(batch.shape[0])}


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
