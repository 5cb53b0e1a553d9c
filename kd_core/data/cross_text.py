"""Prep for cross-tokenizer distillation (`task: cross_tokenizer`): text rows that keep their
characters, tokenized by the teacher's tokenizer with each token's character offsets.

A student with another tokenizer reads the same rows: the trainer tokenizes each row's text with
the student's tokenizer and aligns the two by offsets (`kd_core/data/alignment.py`). Prep never
sees the student's tokenizer, so neither its key nor the cache's covers it: one cache of the
teacher's targets serves students with any tokenizer.

Steps (documents, dedup, shuffle and the split by document are text prep's, `prep.py`):
1. the teacher's tokenizer: `data.tokenizer` as it is, or a byte-level BPE trained on the training
   documents (`data.vocab_size`);
2. each document is tokenized with offsets and cut at token boundaries into chunks of at most
   `data.seq_len - 2` tokens; a chunk's text runs from its first token's start to its last one's
   end, and each row is one chunk's text;
3. the row's teacher view is the tokenization of that text alone: the tokenizer's bos (a
   zero-width token at offset 0), the tokens, and the eos (zero-width at the text's end) when the
   chunk ends its document; padded with pad to `seq_len`. Bits per byte count every byte of every
   row, each predicted from the row's start token on;
4. the training rows are shuffled (seeded) and every split written as Arrow shards.

Columns (one row per chunk): `input_ids` (seq_len) int32, the teacher view; `offset_start`,
`offset_end` (seq_len) int32, each token's characters in the row's text ((0, 0) for the start
token, (n, n) for the end token, 0 for padding); `tokens` (1) int32, the real tokens of the row;
`text_bytes` (W) uint8, the row's UTF-8 text zero-padded to the split's widest row; `text_length`
(1) int32, its bytes; `ends_document` (1) int8.
"""

from __future__ import annotations

import numpy as np

from kd_core.config import DataConfig
from kd_core.data.prep import empty_split_error, split_with_tokenizer
from kd_core.data.shards import SPLITS, write_split
from kd_core.data.sources import FileSource
from kd_core.data.tokenizer import PreparedTokenizer
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store

CROSS_TEXT_COLUMNS = ("input_ids", "offset_start", "offset_end", "tokens", "text_bytes", "text_length", "ends_document")
"""The columns of a cross-tokenizer prep's shards (the module docstring)."""


def prepare_cross_text(config: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
    """Prep's work for cross-tokenizer text into `run`'s folder: (metrics, details)."""
    documents, splits, prepared, metrics = split_with_tokenizer(config, store, run, source)
    special_ids = prepared.ids()
    details: dict = {
        "seq_len": config.seq_len, "vocab_size": prepared.tokenizer.get_vocab_size(), "special_token_ids": special_ids, "splits": {},
        "cross_tokenizer": {"text_columns": list(CROSS_TEXT_COLUMNS)},
    }
    with run.timed("tokenize_and_cut"), progress_bar("prep: tokenize", total=len(documents)) as bar:
        for split in SPLITS:
            columns = text_rows(prepared, splits[split], config.seq_len, bar.advance)
            if len(columns["input_ids"]) == 0:
                raise empty_split_error(split, splits[split], config)
            if split == "train":
                order = np.random.default_rng(config.seed).permutation(len(columns["input_ids"]))
                columns = {name: values[order] for name, values in columns.items()}
            details["splits"][split] = write_split(run, split, columns, config.rows_per_shard)
            details["splits"][split]["bytes"] = int(columns["text_length"].sum())
            metrics[f"{split}_tokens"] = int(columns["tokens"].sum())
            metrics[f"{split}_bytes"] = int(columns["text_length"].sum())
    return metrics, details


def text_rows(prepared: PreparedTokenizer, documents: list[str], seq_len: int, advance=lambda n: None) -> dict[str, np.ndarray]:
    """The rows of a split's documents (the module docstring's columns)."""
    tokenizer, ids = prepared.tokenizer, prepared.ids()
    room = seq_len - 2
    chunks: list[tuple[str, list[tuple[int, tuple[int, int]]], bool]] = []
    for start in range(0, len(documents), 256):
        batch = documents[start : start + 256]
        for document, encoding in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False), strict=True):
            chunks.extend(document_chunks(document, encoding.offsets, room, tokenizer))
        advance(len(batch))
    rows = len(chunks)
    input_ids = np.full((rows, seq_len), ids["pad"], dtype=np.int32)
    offset_start, offset_end = np.zeros((rows, seq_len), dtype=np.int32), np.zeros((rows, seq_len), dtype=np.int32)
    tokens = np.zeros((rows, 1), dtype=np.int32)
    for row, (text, pieces, ends) in enumerate(chunks):
        view = [(ids["bos"], (0, 0)), *pieces, *([(ids["eos"], (len(text), len(text)))] if ends else [])]
        input_ids[row, : len(view)] = [token for token, _ in view]
        offset_start[row, : len(view)] = [pair[0] for _, pair in view]
        offset_end[row, : len(view)] = [pair[1] for _, pair in view]
        tokens[row, 0] = len(view)
    return {
        "input_ids": input_ids, "offset_start": offset_start, "offset_end": offset_end, "tokens": tokens,
        **utf8_columns([text for text, _, _ in chunks]),
        "ends_document": np.asarray([ends for _, _, ends in chunks], dtype=np.int8).reshape(rows, 1),
    }


def utf8_columns(texts: list[str]) -> dict[str, np.ndarray]:
    """`text_bytes` (rows, W) uint8, each text's UTF-8 zero-padded to the longest (W a multiple of
    8), and `text_length` (rows, 1) int32, its bytes: what `row_texts` reads back."""
    encoded = [text.encode("utf-8") for text in texts]
    text_bytes = np.zeros((len(encoded), -(-max([len(text) for text in encoded] + [1]) // 8) * 8), dtype=np.uint8)
    for row, text in enumerate(encoded):
        text_bytes[row, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return {"text_bytes": text_bytes, "text_length": np.asarray([len(text) for text in encoded], dtype=np.int32).reshape(-1, 1)}


def document_chunks(document: str, offsets, room: int, tokenizer) -> list[tuple[str, list[tuple[int, tuple[int, int]]], bool]]:
    """A document cut into consecutive texts of at most `room` tokens each, every character in
    exactly one: (text, its tokens alone as (id, offsets), whether it ends the document). Cuts fall
    where no token of the document's tokenization overlaps the previous ones (never inside a
    character that byte-level pieces split); a text whose own tokenization is longer than `room`
    is cut earlier. Every token counts, a zero-width one too (a whitespace token whose offsets a
    tokenizer trims, `trim_offsets`); the tokenizer adds no special token here."""
    spans = list(offsets)
    clean, furthest = [], 0  # token indexes where the text may be cut, and their characters
    for index, (start, end) in enumerate(spans):
        if index and start >= furthest:
            clean.append(index)
        furthest = max(furthest, end)
    chunks, first, first_char = [], 0, 0
    while first_char < len(document) and (first < len(spans) or not chunks):
        cuts = [index for index in clean if first < index <= first + room]
        last = len(spans) if first + room >= len(spans) else (cuts[-1] if cuts else first + room)
        while True:
            end_char = len(document) if last >= len(spans) else spans[last][0]
            text = document[first_char:end_char]
            encoding = tokenizer.encode(text, add_special_tokens=False)
            pieces = list(zip(encoding.ids, encoding.offsets, strict=True))
            earlier = [index for index in clean if first < index < last]
            if len(pieces) <= room or not earlier:
                break
            last = earlier[-1]
        chunks.append((text, pieces[:room], last >= len(spans) and len(pieces) <= room))
        first, first_char = last, end_char
    return chunks


def row_texts(text_bytes: np.ndarray, text_length: np.ndarray) -> list[str]:
    """The rows' texts back from their `text_bytes` and `text_length` columns."""
    return [bytes(row[: int(length)]).decode("utf-8") for row, length in zip(np.asarray(text_bytes), np.asarray(text_length).reshape(-1), strict=True)]
