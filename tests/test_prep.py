"""The prep stage: sources (bundled Python docs, txt / JSONL / Parquet files), splits, tokenizer,
packed Arrow shards, and named errors for bad input and damaged shards.

Run: .venv/bin/python -m pytest tests/test_prep.py
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_core.config import DataConfig, StorageConfig
from kd_core.data.tokenizer import END_OF_TEXT
from kd_core.stages.prep import prep
from kd_core.data.shards import ShardError, decode_arrow, encode_arrow, load_split, read_verified
from kd_core.data.sources import DataSourceError, python_docs, split_long
from kd_core.storage import Store

SENTENCES = [f"Document number {i} talks about distillation and about the {i % 7}th teacher." * 3 for i in range(30)]


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path / "store")))


def files_config(paths, **changes) -> DataConfig:
    return DataConfig(**{"source": "files", "files": paths, "vocab_size": 300, "seq_len": 16, "rows_per_shard": 4, **changes})


@pytest.mark.slow
def test_python_docs_are_real_prose():
    documents = []
    for document in python_docs():
        documents.append(document)
        if len(documents) == 200:
            break
    assert len(documents) == 200
    assert any("statement" in doc for doc in documents)  # the language reference topics
    assert max(len(doc) for doc in documents) <= 4000  # long topics are cut into pieces


@pytest.mark.slow
def test_python_docs_are_extracted_once_and_read_back_from_the_machines_cache(tmp_path, monkeypatch):
    """A whole extraction is kept under KDFLOW_CACHE and later runs read it; a partly read corpus
    is not kept; a damaged copy is extracted anew and replaced."""
    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path))
    partly = python_docs()
    next(partly)
    partly.close()
    assert not (tmp_path / "python-docs").exists()
    extracted = list(python_docs())
    (kept,) = (tmp_path / "python-docs").iterdir()
    assert json.loads(kept.read_text()) == extracted and len(extracted) > 1000
    kept.write_text(json.dumps(["what the cache holds is what is read"]))
    assert list(python_docs()) == ["what the cache holds is what is read"]
    kept.write_text('["cut short')
    assert list(python_docs()) == extracted and json.loads(kept.read_text()) == extracted


def test_split_long_keeps_text_and_respects_limit():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(40))
    pieces = list(split_long(text, limit=300))
    assert "\n\n".join(pieces) == text
    assert all(len(piece) <= 300 for piece in pieces)
    assert [len(p) for p in split_long("y" * 700, limit=300)] == [300, 300, 100]


def test_jsonl_txt_and_parquet_sources(tmp_path, store):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": s}) for s in SENTENCES[:10]))
    (tmp_path / "b.txt").write_text("\n\n".join(SENTENCES[10:20]))
    pq.write_table(pa.table({"body": SENTENCES[20:]}), tmp_path / "c.parquet")
    manifest = prep(files_config([str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "c.parquet")], text_field="body"), store)
    assert manifest.metrics["documents"] == 21  # 10 JSONL records + 1 text file + 10 Parquet rows
    train = load_split(store, manifest, "train")
    assert train.shape[1] == 16 and train.max() < manifest.details["vocab_size"]


def test_splits_are_disjoint_documents(tmp_path, store):
    unique = [f"unique-{i}-" + "word " * 40 for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in unique))
    manifest = prep(files_config([str(tmp_path / "docs.jsonl")], val_fraction=0.1, test_fraction=0.1), store)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.local_path(f"{manifest.folder}/tokenizer"))
    texts = {split: tokenizer.decode(load_split(store, manifest, split).reshape(-1)) for split in ("train", "val", "test")}
    markers = {split: {w for w in text.split() if w.startswith("unique-")} for split, text in texts.items()}
    assert markers["test"] and markers["val"]
    assert not markers["train"] & markers["test"] and not markers["train"] & markers["val"]
    assert tokenizer.eos_token == END_OF_TEXT


def test_missing_column_names_file_and_field(tmp_path, store):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataSourceError, match=r"a.jsonl:1: expected a JSON object with a 'text' field \(data.text_field\)"):
        prep(files_config([str(tmp_path / "a.jsonl")]), store)


def test_unmatched_glob_and_unsupported_type(tmp_path, store):
    with pytest.raises(DataSourceError, match="matches no file"):
        prep(files_config([str(tmp_path / "*.jsonl")]), store)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataSourceError, match="data.csv: unsupported file type"):
        prep(files_config([str(tmp_path / "data.csv")]), store)


def test_arrow_roundtrip():
    ids = np.arange(48, dtype=np.int32).reshape(3, 16)
    logprobs = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    decoded = decode_arrow(encode_arrow({"input_ids": ids, "logprobs": logprobs}), "memory")
    assert np.array_equal(decoded["input_ids"], ids) and np.array_equal(decoded["logprobs"], logprobs)


def test_damaged_shards_are_named(tmp_path, store):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES))
    manifest = prep(files_config([str(tmp_path / "d.jsonl")]), store)
    name = manifest.details["splits"]["train"]["shards"][0]
    record = manifest.outputs[name]
    path = store.local_path(record.path)
    original = path.read_bytes()

    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ShardError, match=f"{name}.*truncated"):
        read_verified(store, record)
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ShardError, match=f"{name} is corrupt: its sha256"):
        read_verified(store, record)
    path.unlink()
    with pytest.raises(ShardError, match=f"{name} is missing"):
        read_verified(store, record)
    with pytest.raises(ShardError, match="not a readable Arrow IPC file"):
        decode_arrow(b"garbage" * 10, "shards/x.arrow")


def test_training_rows_are_shuffled_across_shards_so_documents_do_not_stay_together(tmp_path, store):
    # Long numbered documents: packed in order, each one's rows would fill the shards one after another.
    documents = [" ".join(f"d{d}n{i}" for i in range(200)) for d in range(10)]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps({"text": text}) for text in documents))
    manifest = prep(files_config([str(tmp_path / "long.jsonl")]), store)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.local_path(f"{manifest.folder}/tokenizer"))
    rows = load_split(store, manifest, "train")
    assert len(manifest.details["splits"]["train"]["shards"]) > 3
    positions = []
    for row in rows:
        word = next(w for w in tokenizer.decode(row).replace("<|endoftext|>", " ").split() if "n" in w[1:] and w[0] == "d")
        document, number = word[1:].split("n", 1)
        positions.append((int(document), int(number or 0)))
    assert positions != sorted(positions)  # not in document order (documents themselves are shuffled too)
    by_document = {}
    for position in positions:
        by_document.setdefault(position[0], []).append(position[1])
    assert any(numbers != sorted(numbers) for numbers in by_document.values())  # one document's rows are spread out
