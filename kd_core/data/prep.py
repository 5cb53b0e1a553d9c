"""Prep for text (`task: causal_lm`): raw text -> a tokenizer and packed, split token shards.

`prepare_text` is what the prep stage (`kd_core/stages/prep.py`) runs for a language-model task.
Steps:
1. collect documents from the source (`kd_core/data/sources.py` says how files become
   documents), drop exact duplicates (counted), and shuffle them (seeded);
2. split by document into train / val / test, so held-out text never leaks into training;
3. train a byte-level BPE tokenizer on the training documents only, or take `data.tokenizer`
   (e.g. the teacher's) as it is: its own end-of-sequence token separates documents and its pad
   token (else the eos) pads; no token is ever added to it;
4. tokenize, follow each document with the separator and pack them into rows of `seq_len`;
5. shuffle the training rows (seeded), so that every shard is a uniform sample of the split and
   the consecutive rows of one long document land in different shards: a streaming reader that
   shuffles within a buffer then sees batches as varied as a global shuffle would give;
6. write each split as Arrow shards of `rows_per_shard` rows, then the manifest.

Outputs: `tokenizer/` (a Hugging Face tokenizer directory) and `shards/<split>-NNNNN.arrow`; the
manifest's details give the special token ids (`special_token_ids`: bos, eos, pad) that every
model kdflow builds for this data uses. Preference data (`task: reward`) has its own prep with
the same outputs: `kd_core/data/preferences.py`. Tokenizers: `kd_core/data/tokenizer.py`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer

from kd_core.config import DataConfig, StorageConfig
from kd_core.data.shards import SPLITS, split_documents, write_split
from kd_core.data.sources import DataSourceError, FileSource, SourceCounts, python_docs
from kd_core.data.tokenizer import PreparedTokenizer, load_tokenizer, save_hf_tokenizer, train_tokenizer
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store


def prepare_text(config: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
    """Prep's work for text (`python-docs`, `files`) into `run`'s folder: (metrics, details)."""
    documents, splits, prepared, metrics = split_with_tokenizer(config, store, run, source)
    special_ids = prepared.ids()
    details: dict = {
        "seq_len": config.seq_len, "vocab_size": prepared.tokenizer.get_vocab_size(), "special_token_ids": special_ids, "splits": {},
    }
    with run.timed("tokenize_and_pack"), progress_bar("prep: tokenize", total=len(documents)) as bar:
        for split in SPLITS:
            rows = pack(prepared.tokenizer, splits[split], config.seq_len, special_ids["eos"], bar.advance)
            if len(rows) == 0:
                raise empty_split_error(split, splits[split], config)
            if split == "train":
                rows = rows[np.random.default_rng(config.seed).permutation(len(rows))]
            details["splits"][split] = write_split(run, split, {"input_ids": rows}, config.rows_per_shard)
    return metrics | {f"{split}_tokens": details["splits"][split]["tokens"] for split in SPLITS}, details


def split_with_tokenizer(
    config: DataConfig, store: Store, run: StageRun, source: FileSource | None, *, separates_documents: bool = True,
) -> tuple[list[str], dict, PreparedTokenizer, dict]:
    """The documents (steps 1-3 of the module docstring): deduplicated and shuffled, split by
    document, and the tokenizer (`data.tokenizer`, or trained on the training split) saved into
    `run`; with the metrics of what was read. A loaded tokenizer needs an eos only when
    `separates_documents` (the task's `Task.separates_documents`)."""
    counts = SourceCounts()
    with run.timed("collect"):
        documents, duplicates = collect_documents(config, source, counts)
        splits = split_documents(documents, config.val_fraction, config.test_fraction)
    with run.timed("tokenizer"):
        prepared = (
            load_tokenizer(config.tokenizer, store.config, separates_documents=separates_documents)
            if config.tokenizer else train_tokenizer(splits["train"], config.vocab_size)
        )
        save_hf_tokenizer(prepared, run)
    metrics = {
        "documents": len(documents), "characters": sum(len(doc) for doc in documents), "files": counts.files,
        "skipped_empty": counts.skipped_empty, "duplicates_removed": duplicates,
    }
    return documents, splits, prepared, metrics


def check_prep_inputs(config: DataConfig, storage: StorageConfig, *, separates_documents: bool = True) -> list[str]:
    """What prep will read, checked without preparing anything (`kdflow validate --check-inputs`):
    the files are listed and the first record of each (up to 20) read; the tokenizer is loaded.
    Raises the error prep would raise; returns one line per input checked."""
    checked = []
    source = file_source(config, storage)
    if source is not None:
        if config.source == "files":  # preference records are checked one by one when prep reads them
            source.check_records()
        elif config.source == "chat":
            from kd_core.data.chat import first_conversations

            first_conversations(source, config.chat, 20)
        readable = ", first records readable" if config.source in ("files", "chat") else ""
        checked.append(f"data.files: {len(source.files)} files, {source.total_bytes:,} bytes{readable}")
    if config.tokenizer:
        prepared = load_tokenizer(config.tokenizer, storage, separates_documents=separates_documents)
        vocabulary = prepared.tokenizer.get_vocab_size()
        checked.append(f"data.tokenizer: {config.tokenizer} ({vocabulary:,} tokens; separator {prepared.eos!r}, pad {prepared.pad!r})")
    return checked


def file_source(config: DataConfig, storage: StorageConfig) -> FileSource | None:
    """The files `data.files` names, listed (None for the bundled sources)."""
    if config.source == "table":
        return FileSource(config.files, config.text_field, storage, tables=True)
    return FileSource(config.files, config.text_field, storage) if config.source in ("files", "chat", "preferences") else None


def collect_documents(config: DataConfig, source: FileSource | None, counts: SourceCounts) -> tuple[list[str], int]:
    """The documents, without exact duplicates, shuffled (seeded), and how many duplicates went."""
    if source is None:
        documents, duplicates = unique_documents(python_docs())
    else:
        with progress_bar("prep: read bytes", total=source.total_bytes) as bar:
            documents, duplicates = unique_documents(source.documents(counts, bar.advance))
    random.Random(config.seed).shuffle(documents)
    if config.max_documents is not None:
        documents = documents[: config.max_documents]
    if len(documents) < 3:
        raise DataSourceError(
            f"data: found {len(documents)} distinct non-empty documents ({counts.skipped_empty} empty records skipped, "
            f"{duplicates} duplicates dropped); need at least 3 (one per split)"
        )
    return documents, duplicates


def unique_documents(documents: Iterable[str]) -> tuple[list[str], int]:
    """Non-blank documents in order, each exact text once (a file matched twice, a record repeated
    in two files: a copy in a held-out split would leak it into training); and the count dropped."""
    kept, seen, duplicates = [], set(), 0
    for document in documents:
        if not document.strip():
            continue
        fingerprint = hashlib.blake2b(document.encode(), digest_size=16).digest()
        if fingerprint in seen:
            duplicates += 1
            continue
        seen.add(fingerprint)
        kept.append(document)
    return kept, duplicates


def empty_split_error(split: str, documents: list[str], config: DataConfig) -> DataSourceError:
    what = "add data or lower data.seq_len" if split == "train" else f"add data, raise data.{split}_fraction or lower data.seq_len"
    return DataSourceError(
        f"data: the {split} split holds no full row of data.seq_len={config.seq_len} tokens ({len(documents)} documents, "
        f"{sum(len(doc) for doc in documents):,} characters); {what}"
    )


def pack(tokenizer: Tokenizer, documents: Iterable[str], seq_len: int, separator_id: int, advance=lambda n: None) -> np.ndarray:
    """Concatenate documents, each followed by the separator (the tokenizer's eos), and cut into full rows of seq_len."""
    stream: list[int] = []
    batch = list(documents)
    for start in range(0, len(batch), 256):
        for encoding in tokenizer.encode_batch(batch[start : start + 256]):
            stream.extend(encoding.ids)
            stream.append(separator_id)
        advance(len(batch[start : start + 256]))
    usable = len(stream) // seq_len * seq_len
    return np.asarray(stream[:usable], dtype=np.int32).reshape(-1, seq_len)


