"""The preflight (`kdflow validate --deep`, kd_core/preflight.py): each check catches its mismatch
with a message naming the field or file, a matching teacher and student pass every check, the
loss check can fail, and `kdflow run` refuses a cheap mismatch before any stage writes anything.

Teachers and students are tiny Qwen2 / Llama models saved with transformers (tests/hf_models.py);
the chat data is a few JSONL records in tmp_path. Run:
    .venv/bin/python -m pytest tests/test_preflight.py
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from hf_models import CHATML, paragraphs, save_model, style_tokenizer
from kd_core.job import load_config
from kd_core.preflight import (
    TokenizerFacts,
    compare_vocabularies,
    deep_checks,
    determinism_check,
    load_models,
    loss_check,
    sample_batch,
    temperature_check,
    template_check_of,
    vocabulary_checks,
    vocabulary_size,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
OTHER_WORDS = "zebra quantum violet harbour lantern meadow copper orbit saffron glacier thimble walrus".split()
REWRITING_TEMPLATE = "{% for message in messages %}{% if loop.last %}LAST {% endif %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
"""Marks the last turn: rendering a prefix changes an earlier turn's text."""


def other_texts(count: int) -> list[str]:
    import random

    generator = random.Random(5)
    return [" ".join(generator.choice(OTHER_WORDS) for _ in range(30)) for _ in range(count)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Teacher (Qwen2, output layer padded by 13), a matching student, a student with another
    vocabulary, one with another chat template, a Llama-style teacher without a template; chat data."""
    root = tmp_path_factory.mktemp("preflight")
    texts = paragraphs(200, 7)
    qwen = style_tokenizer("qwen", texts)
    made = {
        "teacher": peaked(save_model(root / "teacher", "qwen2", qwen, padded=13)),
        "student": save_model(root / "student", "qwen2", qwen, hidden_size=16, layers=1, seed=1),
        "other_vocabulary": save_model(root / "other_vocabulary", "qwen2", style_tokenizer("qwen", other_texts(200)), hidden_size=16, layers=1),
        "llama": save_model(root / "llama", "llama", style_tokenizer("llama", texts)),
    }
    other_template = style_tokenizer("qwen", texts)
    other_template.chat_template = CHATML.replace("+ '\n' + message['content']", "+ ' \n' + message['content']").replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant \n'"
    )  # a space after the role: still its turns in order
    made["other_template"] = save_model(root / "other_template", "qwen2", other_template, hidden_size=16, layers=1)
    made["padded_student"] = peaked(save_model(root / "padded_student", "qwen2", qwen, hidden_size=16, layers=1, padded=7, seed=2))
    records = [
        {"messages": [{"role": "user", "content": f"what does the teacher return {i}"}, {"role": "assistant", "content": text[:60]}]}
        for i, text in enumerate(paragraphs(10, 3))
    ]
    made["chat"] = root / "chat.jsonl"
    made["chat"].write_text("".join(json.dumps(record) + "\n" for record in records))
    return {name: str(path) for name, path in made.items()}


def peaked(folder):
    """The saved model with its output layer scaled up: random tiny models predict nearly uniform
    distributions, under which every KD term (and a wrong temperature) is nearly 0; a real teacher's
    are peaked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def overrides(tmp_path, folders, *extra) -> list[str]:
    return [
        f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "compute.backend=local",
        "data.source=chat", f"data.files=[{folders['chat']}]", f"teacher.path={folders['teacher']}", "data.max_documents=null",
        "data.seq_len=64", *extra,
    ]


def chat_job(tmp_path, folders, *extra):
    return load_config(TINY, overrides(tmp_path, folders, *extra))


@pytest.fixture(scope="module")
def models_and_batch(folders, tmp_path_factory):
    job = chat_job(tmp_path_factory.mktemp("job"), folders, "student.init=pretrained", f"student.path={folders['student']}")
    teacher, student = load_models(job)
    return job, teacher, student, sample_batch(job), vocabulary_size(job)


def by_name(results):
    return {result.name: result for result in results}


# ------------------------------------------------------------------------------ everything passes
def test_a_matching_teacher_and_student_pass_every_check(tmp_path, folders):
    job = chat_job(tmp_path, folders, "student.init=pretrained", f"student.path={folders['student']}")
    results = by_name(deep_checks(job))
    assert {name: result.status for name, result in results.items()} == {
        "temperatures": "pass", "vocabulary": "pass", "student output layer": "pass", "special tokens": "pass",
        "teacher output layer": "info", "template": "pass", "determinism": "pass", "loss": "pass",
    }, results
    assert "padded (413 rows for 400 tokens)" in results["teacher output layer"].message  # 400 tokens, 13 padded rows
    assert "kdflow" in results["loss"].message and "float64 reference" in results["loss"].message


def test_a_padded_student_on_packed_rows_passes_the_loss_check(tmp_path, folders):
    """Several conversations per row (seq_len 256) and a student whose output layer is padded: the
    reference must keep the conversations apart and cut the padded logits, as training does."""
    job = chat_job(tmp_path, folders, "student.init=pretrained", f"student.path={folders['padded_student']}", "data.seq_len=256")
    batch = sample_batch(job)
    assert (batch["position_ids"][:, 1:] == 0).any()  # a conversation starts inside a row
    for source in ("cache", "online"):
        results = by_name(deep_checks(job.model_copy(update={"distill": job.distill.model_copy(update={"teacher_source": source})})))
        assert results["loss"].status == "pass", results["loss"]


def test_text_data_and_a_student_built_from_config_pass_and_the_template_is_skipped(tmp_path, folders):
    documents = tmp_path / "text.jsonl"
    documents.write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs(12, 4)))
    job = load_config(TINY, overrides(tmp_path, folders, "data.source=files", f"data.files=[{documents}]", "cache.format=sampled"))
    results = by_name(deep_checks(job))
    assert {name: result.status for name, result in results.items()} == {
        "temperatures": "pass", "vocabulary": "pass", "teacher output layer": "info", "template": "skip", "determinism": "pass", "loss": "pass",
    }, results
    assert "sampled cache" in results["loss"].message


# ------------------------------------------------------------------------------------ vocabulary
def test_a_student_with_another_vocabulary_fails_naming_the_tokens(tmp_path, folders):
    job = chat_job(tmp_path, folders, "student.init=pretrained", f"student.path={folders['other_vocabulary']}")
    results = by_name(vocabulary_checks(job, deep=False))
    assert results["vocabulary"].status == "fail"
    assert "student.path: " in results["vocabulary"].message and "tokens have other ids than in data.tokenizer" in results["vocabulary"].message
    config_student = vocabulary_checks(chat_job(tmp_path, folders), deep=False)
    assert [result.status for result in config_student] == ["pass"]  # a student built from config shares the data tokenizer


def test_output_layer_and_special_token_mismatches_are_named():
    vocabulary = {"a": 0, "b": 1, "<eos>": 2, "<end>": 3}
    data = TokenizerFacts("data", vocabulary, {"eos": "<eos>", "bos": None, "pad": "<eos>"}, 4)
    small = TokenizerFacts("small", vocabulary, {"eos": "<end>", "bos": None, "pad": None}, 3)
    results = by_name(compare_vocabularies(data, small))
    assert results["vocabulary"].status == "pass"
    assert results["student output layer"].status == "fail" and "3 rows (config.json vocab_size) but the data tokenizer 4 tokens" in results["student output layer"].message
    assert results["special tokens"].status == "fail" and "eos '<eos>' vs '<end>'" in results["special tokens"].message
    padded = TokenizerFacts("padded", vocabulary, {"eos": "<eos>", "bos": None, "pad": None}, 8)
    results = by_name(compare_vocabularies(data, padded))
    assert results["student output layer"].status == "info" and "cut before the softmax" in results["student output layer"].message
    assert results["special tokens"].status == "warn" and "pad '<eos>' vs None" in results["special tokens"].message


# -------------------------------------------------------------------------------------- template
def test_a_student_template_that_renders_otherwise_names_the_record_and_the_difference(tmp_path, folders):
    job = chat_job(tmp_path, folders, "student.init=pretrained", f"student.path={folders['other_template']}")
    result = template_check_of(job)
    assert result.status == "fail"
    assert f"{folders['chat']}:1: data.tokenizer and student.path render this conversation differently, at character 16" in result.message
    assert "data.chat.template" in result.message


def test_a_tokenizer_without_a_template_or_one_that_rewrites_turns_fails(tmp_path, folders):
    no_template = template_check_of(chat_job(tmp_path, folders, f"teacher.path={folders['llama']}"))
    assert no_template.status == "fail" and "has no chat template" in no_template.message and "data.chat.template" in no_template.message
    job = chat_job(tmp_path, folders)
    job.data.chat.template = REWRITING_TEMPLATE
    rewriting = template_check_of(job)
    assert rewriting.status == "fail" and f"{folders['chat']}:1: the chat template does not render this conversation as its turns" in rewriting.message


# ----------------------------------------------------------------------------------- determinism
class NoisyForward(torch.nn.Module):
    """A model whose forward adds fresh noise to the logits on every call, even in eval mode."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        logits = self.model(**inputs).logits
        return SimpleNamespace(logits=logits + 1e-2 * torch.randn_like(logits))


def test_a_teacher_whose_forward_is_not_deterministic_fails(models_and_batch):
    _, teacher, _, batch, _ = models_and_batch
    assert determinism_check(teacher, batch).status == "pass"
    noisy = determinism_check(NoisyForward(teacher), batch)
    assert noisy.status == "fail" and "two forward passes on the same" in noisy.message and "not deterministic" in noisy.message


# ---------------------------------------------------------------------------------- temperatures
@pytest.mark.parametrize(
    "cache_format, cache_t, loss_t, tail, source, status, words",
    [
        ("topk", 2.0, 1.0, True, "cache", "fail", "cache.temperature 2.0, distill.loss.temperature 1.0: the top-k log-probs with their tail"),
        ("sampled", 2.0, 1.0, True, "cache", "fail", "the draws are at the cache temperature"),
        ("full", 2.0, 1.0, True, "cache", "info", "re-tempers them exactly"),
        ("topk", 2.0, 2.0, False, "cache", "warn", "effectively at 4 while the student is at 2.0"),
        ("topk", 1.0, 2.0, False, "cache", "pass", "temperature-1 cache"),
        ("topk", 2.0, 1.0, True, "online", "pass", "cache.temperature is unused"),
    ],
)
def test_the_temperature_rule_states_the_values(cache_format, cache_t, loss_t, tail, source, status, words):
    result = temperature_check(cache_format, cache_t, loss_t, topk_tail=tail, teacher_source=source, kd_weight=0.5)
    assert result.status == status and words in result.message, result


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize(
    "changes",
    [
        {"teacher_source": "online"},
        {"teacher_source": "online", "divergence": "reverse_kl", "temperature": 2.0},
        {"teacher_source": "online", "divergence": "generalized_jsd", "divergence_parameter": 0.3, "temperature": 1.5},
        {"teacher_source": "online", "divergence": "skew_forward_kl", "fused": True, "fused_chunk_size": 7},
        {"format": "topk"},
        {"format": "topk", "topk_tail": False, "temperature": 2.0},
        {"format": "sampled", "token_weighting": "teacher_confidence"},
        {"format": "full", "cache_temperature": 2.0, "balance_terms": True},
    ],
)
def test_kdflows_loss_matches_the_float64_reference(models_and_batch, changes):
    job, teacher, student, batch, vocab = models_and_batch
    changes = dict(changes)
    source = changes.pop("teacher_source", "cache")
    cache = job.cache.model_copy(update={"format": changes.pop("format", "topk"), "temperature": changes.pop("cache_temperature", changes.get("temperature", 1.0))})
    loss = job.distill.loss.model_copy(update=changes)
    result = loss_check(loss, cache, source, teacher, student, batch, vocab)
    assert result.status == "pass", result.message


def test_the_loss_check_fails_on_a_wrong_temperature_or_a_wrong_mask(models_and_batch):
    from kd_core.losses import DistillationObjective
    from kd_core.tasks.causal_lm_step import CausalLMStep

    job, teacher, student, batch, vocab = models_and_batch
    loss = job.distill.loss.model_copy(update={"temperature": 1.0})
    hot = CausalLMStep(student, DistillationObjective(temperature=2.0))
    wrong_temperature = loss_check(loss, job.cache, "online", teacher, student, batch, vocab, step=hot)
    assert wrong_temperature.status == "fail" and "differs from the float64 reference" in wrong_temperature.message

    objective = DistillationObjective()

    def unmasked(rows, targets):  # every position counts: the prompt and the padding too
        return objective(student(input_ids=rows["input_ids"], position_ids=rows["position_ids"]).logits, rows["input_ids"], targets)

    wrong_mask = loss_check(loss, job.cache, "online", teacher, student, batch, vocab, step=unmasked)
    assert wrong_mask.status == "fail" and "distill.loss (online teacher, forward_kl, T=1)" in wrong_mask.message


# ------------------------------------------------------------------------------------------- CLI
def test_validate_deep_exits_2_naming_the_mismatch_and_0_on_a_clean_job(tmp_path, folders, capsys):
    from kd_core.cli import main

    clean = overrides(tmp_path, folders, "student.init=pretrained", f"student.path={folders['student']}")
    assert main(["validate", "--deep", TINY, *clean]) == 0
    out = capsys.readouterr().out
    assert "preflight" in out and "valid (job" in out
    mismatch = overrides(tmp_path, folders, "student.init=pretrained", f"student.path={folders['other_template']}")
    assert main(["validate", "--deep", TINY, *mismatch]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: template: {folders['chat']}:1: data.tokenizer and student.path render")
    assert not (tmp_path / "store").exists()


def test_run_refuses_a_cheap_mismatch_before_any_stage(tmp_path, folders, capsys):
    from kd_core.cli import main

    mismatch = overrides(tmp_path, folders, "student.init=pretrained", f"student.path={folders['other_vocabulary']}")
    assert main(["run", TINY, *mismatch]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: vocabulary: student.path: ") and "tokens have other ids" in lines[0]
    assert all(line.startswith("error: ") for line in lines) and len(lines) == 2, lines  # and its output layer is smaller
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_reward_job_is_not_checked_as_a_language_model():
    job = load_config(os.path.join(REPO, "configs", "reward_tiny.yaml"), ["distill.loss.temperature=3.0"])
    assert [result.status for result in deep_checks(job)] == ["skip"]
