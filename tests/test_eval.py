"""The eval stage's numbers against direct, position-by-position computations.

Run: .venv/bin/python -m pytest tests/test_eval.py
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_core.config import ArchitectureConfig
from kd_core.eval import inference_speed, measure_models
from kd_core.models import build_causal_lm

VOCAB, SEQ = 40, 12


@pytest.fixture(scope="module")
def models_and_rows():
    teacher = build_causal_lm(ArchitectureConfig(hidden_size=32, num_layers=1, num_heads=2), VOCAB, SEQ, seed=1).eval()
    student = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), VOCAB, SEQ, seed=2).eval()
    rows = torch.randint(0, VOCAB, (7, SEQ), generator=torch.Generator().manual_seed(0))
    return teacher, student, rows


def reference(model, teacher, rows, bins=15):
    """Every metric from its definition, one position at a time."""
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=rows).logits.double(), -1)[:, :-1].flatten(0, 1)
        log_p = torch.log_softmax(teacher(input_ids=rows).logits.double(), -1)[:, :-1].flatten(0, 1)
    targets = rows[:, 1:].flatten()
    nll = kl = top1 = top5 = 0.0
    per_bin = [[] for _ in range(bins)]
    for position in range(len(targets)):
        q, p = log_q[position], log_p[position]
        nll -= float(q[targets[position]])
        kl += float((p.exp() * (p - q)).sum())
        teacher_best = int(p.argmax())
        ranked = q.argsort(descending=True).tolist()
        top1 += ranked[0] == teacher_best
        top5 += teacher_best in ranked[:5]
        confidence = float(q.exp().max())
        per_bin[min(int(confidence * bins), bins - 1)].append((confidence, ranked[0] == int(targets[position])))
    n = len(targets)
    ece = sum(len(b) / n * abs(sum(c for _, c in b) / len(b) - sum(x for x, _ in b) / len(b)) for b in per_bin if b)
    return {"cross_entropy": nll / n, "perplexity": math.exp(nll / n), "kl_to_teacher": kl / n,
            "agreement_top1": top1 / n, "agreement_top5": top5 / n, "ece": ece}


def test_held_out_metrics_match_their_definitions_batch_size_aside(models_and_rows):
    teacher, student, rows = models_and_rows
    expected = reference(student, teacher, rows)
    for batch_size in (1, 3, 7):
        measured = measure_models({"teacher": teacher, "student": student}, rows, batch_size)
        for name, value in expected.items():
            assert measured["student"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, batch_size)
    calibration = measured["student"]["calibration"]
    assert sum(calibration["count"]) == rows[:, 1:].numel() and len(calibration["accuracy"]) == 15
    assert measured["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert measured["teacher"]["agreement_top1"] == measured["teacher"]["agreement_top5"] == 1


def test_inference_speed_times_the_forward_pass(models_and_rows):
    _, student, rows = models_and_rows
    speed = inference_speed(student, rows, batch_size=4, batches=3)
    assert speed["latency_batch_rows"] == 4 and speed["latency_ms"] > 0
    # tokens/s is tokens per timed pass over the mean pass time, so it and the latency agree within noise.
    assert speed["tokens_per_s"] == pytest.approx(4 * SEQ / (speed["latency_ms"] / 1000), rel=0.9)


def test_the_report_is_one_self_contained_page_with_the_verdict_gates_and_plots(models_and_rows):
    import re

    from kd_core.tasks import task_named

    teacher, student, rows = models_and_rows
    metrics = {"split": "test", "rows": len(rows), "tokens": rows.numel(), "device": "CPU"}
    metrics |= measure_models({"teacher": teacher, "student": student}, rows, 4)
    for name, model in (("teacher", teacher), ("student", student)):
        metrics[name] |= inference_speed(model, rows, 4, 2) | {"parameters": 1000, "weight_bytes": 4000}
    metrics["gates"] = [{"gate": "agreement_top1 >= 2", "passed": False, "left": 0.25, "right": 2.0}]
    metrics["gates_passed"] = False
    history = [{"step": s, "loss": 3.0 / s, "ce": 2.0 / s, "kd": 1.0 / s} for s in range(1, 6)]
    metrics["task"] = "causal_lm"
    page = task_named("causal_lm").report_html("tiny <job>", metrics, {"student": history, "teacher": [{"step": 1, "ce": 2.0}]}, None)
    assert page.startswith("<!DOCTYPE html>") and "tiny &lt;job&gt;" in page  # escaped, not markup
    assert "1 of 1 gates failed" in page and 'class="fail">FAIL' in page and "agreement_top1 &gt;= 2" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere


def test_a_diverged_model_gets_an_infinite_perplexity_not_an_overflow(models_and_rows):
    teacher, _, rows = models_and_rows
    diverged = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), VOCAB, SEQ, seed=3).eval()
    with torch.no_grad():
        diverged.lm_head.weight.mul_(1e6)  # logits of ~1e5: cross-entropy far past exp's 709-nat limit
    scores = measure_models({"teacher": teacher, "student": diverged}, rows, batch_size=4)
    assert scores["student"]["cross_entropy"] > 710 and math.isfinite(scores["student"]["cross_entropy"])
    assert scores["student"]["perplexity"] == math.inf
