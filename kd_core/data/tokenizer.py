"""Tokenizers for prep: one kdflow trains (byte-level BPE), or an existing Hugging Face one.

`train_tokenizer` trains on the training split's text; `load_tokenizer` takes a tokenizer
directory (e.g. the teacher's) on any fsspec store as it is: its eos separates documents, its pad
(else eos, else unk) pads, no token is ever added. `save_hf_tokenizer` writes the one prep used
as a Hugging Face directory into the prep step's folder; `tokenizer_identity` hashes a tokenizer
directory's files for the prep key.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd_core.config import StorageConfig
from kd_core.data.sources import DataSourceError
from kd_core.stage import StageRun
from kd_core.storage import content_identity, reaching, url_to_fs

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
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


UNSET_HINT = {"data.tokenizer": " (unset, it is teacher.path's folder)"}


def load_tokenizer(url: str, storage: StorageConfig, *, separates_documents: bool = True, field: str = "data.tokenizer") -> PreparedTokenizer:
    """An existing Hugging Face tokenizer directory (e.g. the teacher's) on any fsspec store, as it
    is: its eos separates documents (`separates_documents`; preference pairs need none), its pad
    token (else its eos, else its unk) pads. No token is added, so every id stays inside the
    teacher's vocabulary; truncation or padding saved in its tokenizer.json is switched off for
    prep (it would silently cut every document). `field` names the folder in errors."""
    from transformers import PreTrainedTokenizerFast

    fs, root = url_to_fs(url, storage)
    with reaching(url, field):
        if not fs.exists(root):
            raise DataSourceError(
                f"{field}: {url} does not exist{UNSET_HINT.get(field, '')}; point it at a Hugging Face "
                "tokenizer directory"
            )
        if not fs.exists(f"{root.rstrip('/')}/tokenizer.json"):
            raise DataSourceError(
                f"{field}: {url} has no tokenizer.json; point it at a Hugging Face tokenizer directory "
                "(a fast tokenizer's save_pretrained writes it; convert a SentencePiece-only one with "
                "AutoTokenizer.from_pretrained(folder, use_fast=True).save_pretrained(folder))"
            )
        with tempfile.TemporaryDirectory(prefix="kdflow-tokenizer-") as folder:
            for name, path in _tokenizer_files(fs, root).items():
                fs.get_file(path, str(Path(folder) / name))
            hf = PreTrainedTokenizerFast.from_pretrained(folder)
            declared = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab()
    if len(hf) > len(declared):
        extra = sorted(set(hf.get_vocab()) - set(declared))
        raise DataSourceError(
            f"{field}: {url}: tokenizer_config.json / special_tokens_map.json name tokens that tokenizer.json lacks "
            f"({', '.join(extra[:4])}); they would get ids past the teacher's vocabulary: name existing tokens instead"
        )
    if hf.eos_token is None and separates_documents:
        raise DataSourceError(
            f"{field}: {url} declares no eos token (tokenizer_config.json 'eos_token'); kdflow separates documents "
            "with it: set it to the end-of-text token the teacher was trained with"
        )
    pad = hf.pad_token or hf.eos_token or hf.unk_token
    if pad is None:
        raise DataSourceError(f"{field}: {url} declares no pad, eos or unk token to pad with; set pad_token in tokenizer_config.json")
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
