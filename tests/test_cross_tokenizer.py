"""Cross-tokenizer distillation end to end (`task: cross_tokenizer`), at the smallest size.

A byte-level BPE teacher is trained here on the bundled Python docs, its top-k cache written in
its vocabulary; a student with a Unigram tokenizer of another size (the `student_tokenizer`
step) distils from that cache over aligned spans, and is measured in bits per byte beside the
teacher and the no-teacher baseline. Then: the cache's key does not depend on the student's
tokenizer (a WordPiece student reuses the same cache), and each KD method trains online.
Run: .venv/bin/python -m pytest tests/test_cross_tokenizer.py
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import REPO
from kd_core.config import ArchitectureConfig, CrossTokenizerLossConfig
from kd_core.data.alignment import SharedVocabulary, token_pieces
from kd_core.data.cross_text import text_rows
from kd_core.data.student_tokenizer import SPECIAL_TOKENS, trained
from kd_core.data.tokenizer import END_OF_TEXT, PAD, train_tokenizer
from kd_core.data.views import StudentView, numpy_rows, teacher_view
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.losses import TeacherTargets
from kd_core.models import build_causal_lm
from kd_core.pipeline import run_pipeline
from kd_core.tasks.cross_tokenizer_step import CrossTokenizerStep

TEXTS = [
    "Knowledge distillation trains a small student to mimic a large teacher; the teacher's tokenizer is not the student's. " * 3,
    "naïve café — 日本語 😀 and\ttabs\n\n   spaces, numbers 12345 and punctuation!?",
    "def tokenize(text):\n    return text.split()",
] * 3


def cross_config(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        "task=cross_tokenizer", f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
        "data.max_documents=60", "student.tokenizer.kind=unigram", "student.tokenizer.vocab_size=200",
        "registry.primary_metric=student.bits_per_byte", "tune.space={}", *overrides,
    ])


def saved_tokenizer(folder, tokenizer, special) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"],
                                      unk_token=special["unk"] or special["eos"])
    wrapped.save_pretrained(folder)
    return wrapped


def ids_of(wrapped) -> dict[str, int]:
    return {name: wrapped.convert_tokens_to_ids(getattr(wrapped, f"{name}_token")) for name in ("bos", "eos", "pad")}


@pytest.mark.parametrize("method", ["uld", "span_kl"])
def test_a_student_reading_the_teachers_own_tokens_with_the_teachers_weights_has_zero_kd(tmp_path, method):
    """With the teacher's tokenizer as the student's and the teacher as the student, every span is
    one token on both sides at the same position: any off-by-one in the view, the spans or the
    targets' positions would show as KD above 0. From online logits and from a top-k cache alike."""
    prepared = train_tokenizer(TEXTS, 300)
    wrapped = saved_tokenizer(tmp_path, prepared.tokenizer, {"bos": END_OF_TEXT, "eos": END_OF_TEXT, "pad": PAD, "unk": None})
    batch = numpy_rows(text_rows(prepared, TEXTS, seq_len=24), 0, 8, "cpu")
    model = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), len(wrapped), 64, seed=0)
    view = StudentView(tmp_path, ids_of(wrapped))
    assert torch.equal(view(batch).input_ids[:, : batch["input_ids"].shape[1]], batch["input_ids"].long()[:, : view(batch).input_ids.shape[1]])
    shared = SharedVocabulary.of(token_pieces(wrapped), token_pieces(wrapped))
    objective = CrossTokenizerLossConfig(method=method, ce_weight=0.0, kd_weight=1.0)
    step = CrossTokenizerStep(model, "student", objective=objective, view=view, shared=shared, vocab_size=len(wrapped))
    logits = model(input_ids=teacher_view(batch).input_ids).logits.detach()
    online = TeacherTargets(logits=logits)
    assert step(batch, online)["kd"].abs() < 1e-5
    logprobs = torch.log_softmax(logits, -1)
    following = torch.cat([batch["input_ids"].long()[:, 1:], batch["input_ids"].long()[:, -1:]], 1)
    top = dataclasses.replace(online.top_k(len(wrapped), 1.0), token_logprobs=logprobs.gather(-1, following.unsqueeze(-1)).squeeze(-1))
    assert step(batch, top)["kd"].abs() < 1e-5
    other = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), len(wrapped), 64, seed=1)
    terms = CrossTokenizerStep(other, "student", objective=objective, view=view, shared=shared, vocab_size=len(wrapped))(batch, online)
    assert terms["kd"] > 1e-3
    terms["loss"].backward()
    assert all(p.grad is not None for p in other.parameters() if p.requires_grad)


def test_the_student_view_aligns_spans_of_the_same_text_with_another_tokenizer(tmp_path):
    prepared = train_tokenizer(TEXTS, 300)
    wrapped = saved_tokenizer(tmp_path, trained("unigram", TEXTS, 120), SPECIAL_TOKENS["unigram"])
    columns = text_rows(prepared, TEXTS, seq_len=24)
    batch = numpy_rows(columns, 0, len(TEXTS), "cpu")
    view = StudentView(tmp_path, ids_of(wrapped))(batch)
    spans = view.spans
    assert len(spans) > 0 and bool((spans.teacher_end > spans.teacher_start).all() and (spans.student_end > spans.student_start).all())
    merged = 0
    for index in range(len(spans)):
        row = int(spans.rows[index])
        teacher = prepared.tokenizer.decode(batch["input_ids"][row, spans.teacher_start[index] + 1 : spans.teacher_end[index] + 1].tolist(), skip_special_tokens=True)
        student = wrapped.decode(view.input_ids[row, spans.student_start[index] + 1 : spans.student_end[index] + 1].tolist(), skip_special_tokens=True)
        assert "".join(teacher.split()) == "".join(student.split()), (teacher, student)
        merged += int(spans.teacher_end[index] - spans.teacher_start[index] > 1 or spans.student_end[index] - spans.student_start[index] > 1)
    assert merged > 0
    assert (view.lengths > 1).all() and int(view.lengths.max()) == view.input_ids.shape[1]


@pytest.mark.slow
def test_a_student_with_another_tokenizer_distils_from_the_teachers_cache_and_is_measured_in_bits_per_byte(tmp_path):
    """In this process, through DeepSpeed (the recipe, configs/cross_tokenizer.yaml, runs the same
    steps on Ray: docs/benchmarks.md)."""
    config = cross_config(tmp_path, "compute.backend=local")
    steps = run_pipeline(config)
    assert steps["cache"].details["layout"]["token_logprobs"] is True
    assert steps["register"].details["version"] == 1
    from kd_core.models import model_copy
    from kd_core.storage import Store

    saved = PreTrainedTokenizerFast.from_pretrained(str(model_copy(Store(config.storage), steps["distill"])))
    assert len(saved) == 200 and saved.eos_token == "</s>"  # the student's own tokenizer is saved (and registered) with it
    metrics = steps["eval"].metrics
    for name in ("teacher", "student", "baseline"):
        assert 0 < metrics[name]["bits_per_byte"] < 8 and math.isfinite(metrics[name]["cross_entropy"])
    assert metrics["student"]["tokens_per_byte"] != metrics["teacher"]["tokens_per_byte"]
    assert 0 <= metrics["student"]["span_agreement"] <= 1
    assert metrics["student"]["round_trip"] == metrics["teacher"]["round_trip"] == 1.0  # byte-level BPE and the Unigram: lossless
    assert all(math.isfinite(metrics[name]["bytes_per_s"]) and metrics[name]["latency_ms"] > 0 for name in ("teacher", "student"))
    wordpiece = cross_config(tmp_path, "compute.backend=local", "student.tokenizer.kind=wordpiece")
    again = run_pipeline(wordpiece, until="distill")
    assert again["cache"].key == steps["cache"].key and again["cache"].reused
    assert again["distill"].key != steps["distill"].key
    tokenizer_manifest = Store(config.storage).path(f"student_tokenizer/{again['distill'].inputs['student_tokenizer']}/manifest.json")
    made = Path(tokenizer_manifest).stat().st_mtime_ns
    run_pipeline(wordpiece, until="distill", force=frozenset({"distill"}))
    assert Path(tokenizer_manifest).stat().st_mtime_ns > made  # forcing a step that reads it redoes it


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uld", "span_kl", "dskd"])
def test_each_method_trains_online(tmp_path, method):
    config = cross_config(
        tmp_path, "compute.backend=local", "distill.deepspeed.enabled=false", "distill.teacher_source=online",
        f"distill.cross_tokenizer.method={method}", "distill.train.max_steps=4",
    )
    steps = run_pipeline(config, until="distill")
    assert steps["distill"].metrics["kd"] > 0


@pytest.mark.slow
def test_the_preflight_reports_overlap_alignment_and_a_tokenizer_that_drops_characters(tmp_path):
    from kd_core.preflight import deep_checks

    results = {result.name: result for result in deep_checks(cross_config(tmp_path, "student.tokenizer.kind=wordpiece"), records=4)}
    assert results["losses"].status == "pass" and "dskd" not in results["losses"].message  # from the cache
    assert results["vocabulary overlap"].status == "pass" and "strings in both vocabularies" in results["vocabulary overlap"].message
    assert results["aligned spans"].status == "pass" and "e.g. teacher" in results["aligned spans"].message
    assert results["teacher round trip"].status == "pass"
    assert results["student round trip"].status == "warn"  # WordPiece drops the spaces
    assert "comes back as" in results["student round trip"].message
    online = {result.name: result for result in deep_checks(cross_config(tmp_path, "distill.teacher_source=online"), records=4)}
    assert "dskd" in online["losses"].message and online["student round trip"].status == "pass"  # the Unigram student is lossless


@pytest.mark.slow
def test_a_missing_student_tokenizer_or_a_data_tokenizer_that_is_not_the_teachers_stops_before_any_step(tmp_path):
    from kd_core.checks import check_inputs
    from kd_core.data.sources import DataSourceError
    from kd_core.preflight import cheap_checks, deep_checks
    from hf_models import save_model, style_tokenizer

    missing = cross_config(tmp_path, f"student.tokenizer.path={tmp_path / 'nowhere'}")
    row = {result.name: result for result in cheap_checks(missing)}["student tokenizer"]
    assert row.status == "fail" and "student.tokenizer.path:" in row.message and "does not exist" in row.message
    with pytest.raises(DataSourceError, match="student.tokenizer.path"):
        check_inputs(missing)
    texts = [" ".join(TEXTS)] * 4
    save_model(tmp_path / "teacher", "gpt2", style_tokenizer("gpt2", texts))
    style_tokenizer("llama", texts).save_pretrained(tmp_path / "llama")
    mismatched = cross_config(tmp_path, f"teacher.path={tmp_path / 'teacher'}", f"data.tokenizer={tmp_path / 'llama'}")
    row = {result.name: result for result in deep_checks(mismatched, records=2)}["tokenizers"]
    assert row.status == "fail" and "is not the teacher's tokenizer" in row.message


@pytest.mark.slow
def test_the_job_refuses_what_it_cannot_do_and_compiles_to_the_same_kubeflow_dag(tmp_path):
    import json

    import yaml

    from kd_core.config import ConfigError
    from pipelines import engines

    for overrides, named in (
        (["distill.cross_tokenizer.method=dskd"], "distill.cross_tokenizer.method: dskd"),
        (["student.init=pretrained", "student.path=/nowhere"], "student.init"),
        (["cache.temperature=2.0"], "distill.cross_tokenizer.temperature"),
        (["distill.teacher_source=on_policy"], "distill.teacher_source"),
        (["tune.space={student.tokenizer.vocab_size: {kind: choice, values: [100, 200]}}"], "tune.space.student.tokenizer.vocab_size"),
        (["registry.primary_metric=student.perplexity"], "registry.primary_metric"),
    ):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            cross_config(tmp_path, *overrides)
    config = load_config(REPO / "configs" / "cross_tokenizer.yaml")
    spec, *_platform = yaml.safe_load_all(engines.compile_pipeline(config, tmp_path / "cross.yaml", "distill").read_text())
    job = json.loads(spec["root"]["inputDefinitions"]["parameters"]["job"]["defaultValue"])
    assert job["task"] == "cross_tokenizer" and job["student"]["tokenizer"]["kind"] == "unigram"
    assert set(spec["root"]["dag"]["tasks"]) >= {"prep", "cache", "distill", "evaluate"}
