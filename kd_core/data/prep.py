"""The prep stage: raw text -> a trained tokenizer and packed, split token shards.

Steps:
1. collect documents from the source and shuffle them (seeded);
2. split by document into train / val / test, so held-out text never leaks into training;
3. train a byte-level BPE tokenizer on the training documents only;
4. tokenize, join documents with the end-of-text token and pack them into rows of `seq_len`;
5. shuffle the training rows (seeded), so that every shard is a uniform sample of the split and
   the consecutive rows of one long document land in different shards: a streaming reader that
   shuffles within a buffer then sees batches as varied as a global shuffle would give;
6. write each split as Arrow shards of `rows_per_shard` rows, then the manifest.

Outputs: `tokenizer/` (a Hugging Face tokenizer directory) and `shards/<split>-NNNNN.arrow`.
Preference data (`task: reward`) takes its own path with the same outputs:
`kd_core/data/preferences.py`.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterable

import fsspec
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd_core.config import DataConfig
from kd_core.data.shards import encode_arrow
from kd_core.data.sources import DataSourceError, file_documents, python_docs
from kd_core.manifest import Manifest
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store, storage_options

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPLITS = ("train", "val", "test")
PREFERENCE_SOURCES = ("preferences", "digit-preferences")


def prep(config: DataConfig, store: Store, *, force: bool = False) -> Manifest:
    run = StageRun(store, "prep", prep_section(config), inputs={}, force=force)
    if run.reused:
        return run.reused
    if config.source in PREFERENCE_SOURCES:
        from kd_core.data.preferences import prep_preferences

        return prep_preferences(config, store, run)
    with run.timed("collect"):
        documents = collect_documents(config, store)
        splits = split_documents(documents, config.val_fraction, config.test_fraction)
    with run.timed("tokenizer"):
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer, store)
        else:
            tokenizer = train_tokenizer(splits["train"], config.vocab_size)
        save_hf_tokenizer(tokenizer, run)
    details: dict = {"seq_len": config.seq_len, "vocab_size": tokenizer.get_vocab_size(), "splits": {}}
    with run.timed("tokenize_and_pack"), progress_bar("prep: tokenize", total=len(documents)) as bar:
        for split in SPLITS:
            rows = pack(tokenizer, splits[split], config.seq_len, bar.advance)
            if split == "train":
                rows = rows[np.random.default_rng(config.seed).permutation(len(rows))]
            details["splits"][split] = write_split(run, split, rows, config.rows_per_shard)
    metrics = {
        "documents": len(documents),
        "characters": sum(len(doc) for doc in documents),
        **{f"{split}_tokens": details["splits"][split]["tokens"] for split in SPLITS},
    }
    return run.finish(metrics=metrics, details=details)


def prep_section(config: DataConfig) -> dict:
    """The settings the step's key covers: the preference settings only for preference data (so
    adding them changed no text job's key)."""
    return config.model_dump(mode="json", exclude=None if config.source in PREFERENCE_SOURCES else {"preferences"})


def collect_documents(config: DataConfig, store: Store) -> list[str]:
    if config.source == "python-docs":
        documents = list(python_docs())
    else:
        documents = list(file_documents(config.files, config.text_field, storage_options(store.config)))
    documents = [doc for doc in documents if doc.strip()]
    random.Random(config.seed).shuffle(documents)
    if config.max_documents is not None:
        documents = documents[: config.max_documents]
    if len(documents) < 3:
        raise DataSourceError(f"data: found {len(documents)} documents; need at least 3 (one per split)")
    return documents


def split_documents(documents: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Held-out splits first, at least one document each; the rest trains."""
    n_val = max(1, round(len(documents) * val_fraction))
    n_test = max(1, round(len(documents) * test_fraction))
    return {
        "val": documents[:n_val],
        "test": documents[n_val : n_val + n_test],
        "train": documents[n_val + n_test :],
    }


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def load_tokenizer(url: str, store: Store) -> Tokenizer:
    """An existing tokenizer (e.g. the teacher's), from `<url>/tokenizer.json` on any fsspec store."""
    fs, root = fsspec.core.url_to_fs(url, **storage_options(store.config))
    path = f"{root.rstrip('/')}/tokenizer.json"
    if not fs.exists(path):
        raise DataSourceError(f"data.tokenizer: {url} has no tokenizer.json; point it at a Hugging Face tokenizer directory")
    tokenizer = Tokenizer.from_str(fs.cat_file(path).decode())
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        tokenizer.add_special_tokens([END_OF_TEXT, PAD])
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, run: StageRun) -> None:
    """Store the tokenizer as a Hugging Face directory, loadable with AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD, unk_token=END_OF_TEXT
    )
    with tempfile.TemporaryDirectory() as folder:
        wrapped.save_pretrained(folder)
        run.upload_dir(folder, "tokenizer")


def pack(tokenizer: Tokenizer, documents: Iterable[str], seq_len: int, advance=lambda n: None) -> np.ndarray:
    """Concatenate documents, each followed by end-of-text, and cut into full rows of seq_len."""
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    stream: list[int] = []
    batch = list(documents)
    for start in range(0, len(batch), 256):
        for encoding in tokenizer.encode_batch(batch[start : start + 256]):
            stream.extend(encoding.ids)
            stream.append(end_of_text)
        advance(len(batch[start : start + 256]))
    usable = len(stream) // seq_len * seq_len
    return np.asarray(stream[:usable], dtype=np.int32).reshape(-1, seq_len)


def write_split(run: StageRun, split: str, rows: np.ndarray, rows_per_shard: int) -> dict:
    names = write_shards(run, split, {"input_ids": rows}, rows_per_shard)
    return {"shards": names, "rows": int(len(rows)), "tokens": int(rows.size)}


def write_shards(run: StageRun, split: str, columns: dict[str, np.ndarray], rows_per_shard: int) -> list[str]:
    """`shards/<split>-NNNNN.arrow`, `rows_per_shard` rows of every column each; their names."""
    names = []
    rows = len(next(iter(columns.values())))
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        name = f"shards/{split}-{index:05d}.arrow"
        run.write_bytes(name, encode_arrow({column: values[start : start + rows_per_shard] for column, values in columns.items()}))
        names.append(name)
    return names
