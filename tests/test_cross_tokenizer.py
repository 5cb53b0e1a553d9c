"""Cross-tokenizer distillation end to end (`task: cross_tokenizer`), at the smallest size.

A byte-level BPE teacher is trained here on the bundled Python docs, its top-k cache written in
its vocabulary; a student with a Unigram tokenizer of another size (the `student_tokenizer`
step) distils from that cache over aligned spans, and is measured in bits per byte beside the
teacher and the no-teacher baseline. Then: the cache's key does not depend on the student's
tokenizer (a WordPiece student reuses the same cache), and each KD method trains online.
Run: .venv/bin/python -m pytest tests/test_cross_tokenizer.py
"""

from __future__ import annotations

import math

import pytest

from kd_core.job import load_config
from kd_core.pipeline import run_pipeline

from conftest import REPO


def cross_config(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        "task=cross_tokenizer", f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "compute.backend=local", "data.max_documents=60", "student.tokenizer.kind=unigram", "student.tokenizer.vocab_size=200",
        "distill.deepspeed.enabled=false", "registry.primary_metric=student.bits_per_byte", "tune.space={}", *overrides,
    ])


def test_a_student_with_another_tokenizer_distils_from_the_teachers_cache_and_is_measured_in_bits_per_byte(tmp_path):
    config = cross_config(tmp_path)
    steps = run_pipeline(config, until="eval")
    assert steps["cache"].details["layout"]["token_logprobs"] is True
    metrics = steps["eval"].metrics
    for name in ("teacher", "student", "baseline"):
        assert 0 < metrics[name]["bits_per_byte"] < 8 and math.isfinite(metrics[name]["cross_entropy"])
    assert metrics["student"]["tokens_per_byte"] != metrics["teacher"]["tokens_per_byte"]
    assert 0 <= metrics["student"]["span_agreement"] <= 1
    history = steps["distill"].details
    assert history is not None
    wordpiece = cross_config(tmp_path, "student.tokenizer.kind=wordpiece")
    again = run_pipeline(wordpiece, until="distill")
    assert again["cache"].key == steps["cache"].key and again["cache"].reused
    assert again["distill"].key != steps["distill"].key


@pytest.mark.parametrize("method", ["uld", "span_kl", "dskd"])
def test_each_method_trains_online(tmp_path, method):
    config = cross_config(tmp_path, "distill.teacher_source=online", f"distill.cross_tokenizer.method={method}", "distill.train.max_steps=4")
    steps = run_pipeline(config, until="distill")
    assert steps["distill"].metrics["kd"] > 0
