"""The prep stage: raw text -> a tokenizer and packed, split token shards.

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

The step's key covers the data settings, the identity of every matched file (URL, size, ETag or
modification time) and of the tokenizer's files: an edited or added file, or a changed tokenizer,
gives a new key, so a scheduled run over a refreshed bucket prepares (and distills) again.

Outputs: `tokenizer/` (a Hugging Face tokenizer directory) and `shards/<split>-NNNNN.arrow`; the
manifest's details give the special token ids (`special_token_ids`: bos, eos, pad) that every
model kdflow builds for this data uses. Preference data (`task: reward`) takes its own path with
the same outputs: `kd_core/data/preferences.py`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd_core.config import DataConfig, StorageConfig
from kd_core.data.shards import encode_arrow
from kd_core.data.sources import DataSourceError, FileSource, SourceCounts, python_docs
from kd_core.manifest import Manifest
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store, content_identity, reaching, url_to_fs

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPLITS = ("train", "val", "test")
PREFERENCE_SOURCES = ("preferences", "digit-preferences")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)
"""What a Hugging Face tokenizer directory holds besides model weights (read, hashed, copied)."""


@dataclass(frozen=True)
class PreparedTokenizer:
    """A tokenizer and the special tokens kdflow uses with it (all already in its vocabulary)."""

    tokenizer: Tokenizer
    bos: str
    eos: str
    """Separates documents in packed rows; the end of a generation."""
    pad: str
    """Fills rows shorter than seq_len (preference pairs); never trained on."""
    hf: object | None = None
    """The `transformers` tokenizer it was loaded as (None: trained here); saved as it is."""

    def ids(self) -> dict[str, int]:
        return {name: self.tokenizer.token_to_id(getattr(self, name)) for name in ("bos", "eos", "pad")}


def prep(config: DataConfig, store: Store, *, force: bool = False) -> Manifest:
    source = file_source(config, store.config)
    run = StageRun(store, "prep", prep_section(config, store.config, source), inputs={}, force=force)
    if run.reused:
        return run.reused
    if config.source in PREFERENCE_SOURCES:
        from kd_core.data.preferences import prep_preferences

        return prep_preferences(config, store, run)
    counts = SourceCounts()
    with run.timed("collect"):
        documents, duplicates = collect_documents(config, source, counts)
        splits = split_documents(documents, config.val_fraction, config.test_fraction)
    with run.timed("tokenizer"):
        prepared = load_tokenizer(config.tokenizer, store.config) if config.tokenizer else train_tokenizer(splits["train"], config.vocab_size)
        save_hf_tokenizer(prepared, run)
    special_ids = prepared.ids()
    details: dict = {
        "seq_len": config.seq_len, "vocab_size": prepared.tokenizer.get_vocab_size(), "special_token_ids": special_ids, "splits": {},
    }
    with run.timed("tokenize_and_pack"), progress_bar("prep: tokenize", total=len(documents)) as bar:
        for split in SPLITS:
            rows = pack(prepared.tokenizer, splits[split], config.seq_len, special_ids["eos"], bar.advance)
            if len(rows) == 0:
                raise _empty_split(split, splits[split], config)
            if split == "train":
                rows = rows[np.random.default_rng(config.seed).permutation(len(rows))]
            details["splits"][split] = write_split(run, split, rows, config.rows_per_shard)
    metrics = {
        "documents": len(documents),
        "characters": sum(len(doc) for doc in documents),
        "files": counts.files,
        "skipped_empty": counts.skipped_empty,
        "duplicates_removed": duplicates,
        **{f"{split}_tokens": details["splits"][split]["tokens"] for split in SPLITS},
    }
    return run.finish(metrics=metrics, details=details)


def prep_section(config: DataConfig, storage: StorageConfig, source: FileSource | None = None) -> dict:
    """What the step's key covers: the data settings (the preference settings only for preference
    data), the identity of every file read and of the tokenizer's files."""
    settings = config.model_dump(mode="json", exclude=None if config.source in PREFERENCE_SOURCES else {"preferences"})
    section: dict = {"data": settings}
    source = source or file_source(config, storage)
    if source is not None:
        listing = json.dumps(source.listing(), sort_keys=True).encode()
        section["files"] = {"count": len(source.files), "bytes": source.total_bytes, "identity": hashlib.sha256(listing).hexdigest()}
    elif config.source == "python-docs":
        section["python"] = platform.python_version()  # the bundled text is the running Python's
    if config.tokenizer:
        section["tokenizer_identity"] = tokenizer_identity(config.tokenizer, storage)
    return section


def check_prep_inputs(config: DataConfig, storage: StorageConfig) -> list[str]:
    """What prep will read, checked without preparing anything (`kdflow validate --check-inputs`):
    the files are listed and the first record of each (up to 20) read; the tokenizer is loaded.
    Raises the error prep would raise; returns one line per input checked."""
    checked = []
    source = file_source(config, storage)
    if source is not None:
        if config.source == "files":  # preference records are checked one by one when prep reads them
            source.check_records()
        readable = ", first records readable" if config.source == "files" else ""
        checked.append(f"data.files: {len(source.files)} files, {source.total_bytes:,} bytes{readable}")
    if config.tokenizer:
        prepared = load_tokenizer(config.tokenizer, storage, separates_documents=config.source not in PREFERENCE_SOURCES)
        vocabulary = prepared.tokenizer.get_vocab_size()
        checked.append(f"data.tokenizer: {config.tokenizer} ({vocabulary:,} tokens; separator {prepared.eos!r}, pad {prepared.pad!r})")
    return checked


def file_source(config: DataConfig, storage: StorageConfig) -> FileSource | None:
    """The files `data.files` names, listed (None for the bundled sources)."""
    return FileSource(config.files, config.text_field, storage) if config.source in ("files", "preferences") else None


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


def split_documents(documents: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Held-out splits first, at least one document each; the rest trains."""
    n_val = max(1, round(len(documents) * val_fraction))
    n_test = max(1, round(len(documents) * test_fraction))
    return {
        "val": documents[:n_val],
        "test": documents[n_val : n_val + n_test],
        "train": documents[n_val + n_test :],
    }


def _empty_split(split: str, documents: list[str], config: DataConfig) -> DataSourceError:
    what = "add data or lower data.seq_len" if split == "train" else f"add data, raise data.{split}_fraction or lower data.seq_len"
    return DataSourceError(
        f"data: the {split} split holds no full row of data.seq_len={config.seq_len} tokens ({len(documents)} documents, "
        f"{sum(len(doc) for doc in documents):,} characters); {what}"
    )


def train_tokenizer(documents: list[str], vocab_size: int) -> PreparedTokenizer:
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
    return PreparedTokenizer(tokenizer, bos=END_OF_TEXT, eos=END_OF_TEXT, pad=PAD)


def load_tokenizer(url: str, storage: StorageConfig, *, separates_documents: bool = True) -> PreparedTokenizer:
    """An existing Hugging Face tokenizer directory (e.g. the teacher's) on any fsspec store, as it
    is: its eos separates documents (`separates_documents`; preference pairs need none), its pad
    token (else its eos, else its unk) pads. No token is added, so every id stays inside the
    teacher's vocabulary; truncation or padding saved in its tokenizer.json is switched off for
    prep (it would silently cut every document)."""
    from transformers import PreTrainedTokenizerFast

    fs, root = url_to_fs(url, storage)
    with reaching(url, "data.tokenizer"):
        if not fs.exists(root):
            raise DataSourceError(
                f"data.tokenizer: {url} does not exist (unset, it is teacher.path's folder); point it at a Hugging Face "
                "tokenizer directory"
            )
        if not fs.exists(f"{root.rstrip('/')}/tokenizer.json"):
            raise DataSourceError(
                f"data.tokenizer: {url} has no tokenizer.json; point it at a Hugging Face tokenizer directory "
                "(a folder written by tokenizer.save_pretrained)"
            )
        with tempfile.TemporaryDirectory(prefix="kdflow-tokenizer-") as folder:
            for name, path in _tokenizer_files(fs, root).items():
                fs.get_file(path, str(Path(folder) / name))
            hf = PreTrainedTokenizerFast.from_pretrained(folder)
            declared = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab()
    if len(hf) > len(declared):
        extra = sorted(set(hf.get_vocab()) - set(declared))
        raise DataSourceError(
            f"data.tokenizer: {url}: tokenizer_config.json / special_tokens_map.json name tokens that tokenizer.json lacks "
            f"({', '.join(extra[:4])}); they would get ids past the teacher's vocabulary: name existing tokens instead"
        )
    if hf.eos_token is None and separates_documents:
        raise DataSourceError(
            f"data.tokenizer: {url} declares no eos token (tokenizer_config.json 'eos_token'); kdflow separates documents "
            "with it: set it to the end-of-text token the teacher was trained with"
        )
    pad = hf.pad_token or hf.eos_token or hf.unk_token
    if pad is None:
        raise DataSourceError(f"data.tokenizer: {url} declares no pad, eos or unk token to pad with; set pad_token in tokenizer_config.json")
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return PreparedTokenizer(backend, bos=hf.bos_token or hf.eos_token or pad, eos=hf.eos_token or pad, pad=pad, hf=hf)


def tokenizer_identity(url: str, storage: StorageConfig) -> str:
    """Hash of the tokenizer files' contents (or ETags): a changed tokenizer changes the prep key."""
    fs, root = url_to_fs(url, storage)
    digest = hashlib.sha256()
    with reaching(url, "data.tokenizer"):
        for name, path in _tokenizer_files(fs, root).items():
            digest.update(f"{name}={content_identity(fs, path)}\n".encode())
    return digest.hexdigest()


def _tokenizer_files(fs, root: str) -> dict[str, str]:
    """name -> path of each of `TOKENIZER_FILES` that the folder holds."""
    paths = {name: f"{root.rstrip('/')}/{name}" for name in TOKENIZER_FILES}
    return {name: path for name, path in paths.items() if fs.exists(path)}


def save_hf_tokenizer(prepared: PreparedTokenizer, run: StageRun) -> None:
    """Store the tokenizer as a Hugging Face directory, loadable with AutoTokenizer; a loaded one
    keeps its own settings (chat template, special tokens) and gains a pad token only by naming
    an existing one."""
    from transformers import PreTrainedTokenizerFast

    if prepared.hf is not None:
        wrapped = prepared.hf
        wrapped.pad_token = wrapped.pad_token or prepared.pad
    else:
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=prepared.tokenizer, bos_token=prepared.bos, eos_token=prepared.eos, pad_token=prepared.pad,
            unk_token=END_OF_TEXT,
        )
    with tempfile.TemporaryDirectory() as folder:
        wrapped.save_pretrained(folder)
        run.upload_dir(folder, "tokenizer")


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
