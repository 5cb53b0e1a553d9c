"""Prep for sentence-embedding distillation (`task: embedding`): documents -> texts, each one row.

An embedding model maps one text to one vector, so a row is one text, not a packed stretch of
tokens. Steps (documents, dedup, shuffle, the split by document and the tokenizer are text
prep's, `prep.py`):
1. each document's paragraphs (blank-line-separated blocks: headings, prose, list items), with
   runs of whitespace inside them collapsed; a paragraph longer than `data.texts.max_chars` is cut
   at spaces; pieces shorter than `data.texts.min_chars` are dropped;
2. a text is kept once: the first time it appears, in split order train, val, test (a paragraph
   that two documents share, e.g. "Return the result.", would otherwise leak into a held-out
   split);
3. each text is tokenized the way the teacher reads it, its tokenizer's own special tokens
   included (BERT's [CLS] ... [SEP]) and cut to `data.seq_len` tokens; padded with the pad token;
4. the training rows are shuffled (seeded) and every split written as Arrow shards.

Columns (one row per text): `input_ids` (seq_len) int32; `tokens` (1) int32, the real tokens;
`text_bytes` (W) uint8, the text's UTF-8 zero-padded to the split's longest; `text_length` (1)
int32, its bytes. `row_texts` (`cross_text.py`) gives the texts back. The manifest's metrics count
each split's texts, tokens and the texts cut at `seq_len` (`<split>_truncated`).
"""

from __future__ import annotations

import re

import numpy as np

from kd_core.config import DataConfig, TextsConfig
from kd_core.data.cross_text import utf8_columns
from kd_core.data.prep import split_with_tokenizer
from kd_core.data.shards import SPLITS, write_split
from kd_core.data.sources import DataSourceError, FileSource, split_long
from kd_core.data.tokenizer import PreparedTokenizer
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store

EMBEDDING_TEXT_COLUMNS = ("input_ids", "tokens", "text_bytes", "text_length")
"""The columns of an embedding prep's shards (the module docstring)."""

_WHITESPACE = re.compile(r"\s+")
MIN_TEXTS = {"train": 2, "val": 11, "test": 11}
"""Texts a split needs: a contrastive batch needs two; a held-out one, a text and its 10 nearest others."""
WHY = {"train": "two to contrast", "val": "eval ranks each text's 10 nearest others", "test": "eval ranks each text's 10 nearest others"}


def prepare_embedding_texts(config: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
    """Prep's work for an embedding task into `run`'s folder: (metrics, details)."""
    documents, splits, prepared, metrics = split_with_tokenizer(config, store, run, source, separates_documents=False)
    special_ids = prepared.ids()
    details: dict = {
        "seq_len": config.seq_len, "vocab_size": prepared.tokenizer.get_vocab_size(), "special_token_ids": special_ids, "splits": {},
    }
    seen: set[str] = set()
    with run.timed("cut_and_tokenize"), progress_bar("prep: texts", total=len(documents)) as bar:
        for split in SPLITS:
            texts = []
            for document in splits[split]:
                texts.extend(text for text in document_texts(document, config.texts) if text not in seen and not seen.add(text))
                bar.advance(1)
            if len(texts) < MIN_TEXTS[split]:
                grow = "lower data.val_fraction and data.test_fraction" if split == "train" else f"raise data.{split}_fraction"
                raise DataSourceError(
                    f"data: the {split} split holds {len(texts)} texts of at least data.texts.min_chars={config.texts.min_chars} "
                    f"characters ({len(splits[split])} documents); it needs at least {MIN_TEXTS[split]} ({WHY[split]}): add data, "
                    f"lower data.texts.min_chars or {grow}"
                )
            columns = text_columns(prepared, texts, config.seq_len)
            truncated = int(columns.pop("truncated").sum())
            if split == "train":
                order = np.random.default_rng(config.seed).permutation(len(texts))
                columns = {name: values[order] for name, values in columns.items()}
            details["splits"][split] = write_split(run, split, columns, config.rows_per_shard)
            metrics[f"{split}_texts"] = len(texts)
            metrics[f"{split}_tokens"] = int(columns["tokens"].sum())
            metrics[f"{split}_truncated"] = truncated
    return metrics, details


def document_texts(document: str, texts: TextsConfig) -> list[str]:
    """A document's paragraphs, whitespace collapsed, cut to `max_chars`, at least `min_chars` long."""
    kept = []
    for paragraph in document.split("\n\n"):
        flat = _WHITESPACE.sub(" ", paragraph).strip()
        if not flat:
            continue
        kept.extend(piece.strip() for piece in split_long(flat, texts.max_chars) if len(piece.strip()) >= texts.min_chars)
    return kept


def text_columns(prepared: PreparedTokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """The rows of a split's texts (the module docstring's columns), and `truncated`: (rows,) bool,
    whether each text was cut at `seq_len` (not a column: prep counts them)."""
    tokenizer = prepared.tokenizer
    tokenizer.enable_truncation(max_length=seq_len)  # keeps the closing special token ([SEP]) of a cut text
    try:
        encodings = [encoding for start in range(0, len(texts), 512) for encoding in tokenizer.encode_batch(texts[start : start + 512])]
    finally:
        tokenizer.no_truncation()
    rows = len(texts)
    input_ids = np.full((rows, seq_len), prepared.ids()["pad"], dtype=np.int32)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
    return {
        "input_ids": input_ids,
        "tokens": np.asarray([len(encoding.ids) for encoding in encodings], dtype=np.int32).reshape(rows, 1),
        **utf8_columns(texts),
        "truncated": np.asarray([bool(encoding.overflowing) for encoding in encodings]),
    }
