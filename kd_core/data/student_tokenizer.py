"""The student's own tokenizer (`task: cross_tokenizer`, and a pretrained `task: embedding` student's
folder's: the `student_tokenizer` step).

A folder the user names (`student.tokenizer.path`, e.g. a Qwen student's beside a Llama teacher)
is taken as it is; otherwise one of three kinds is trained on the prepared training rows' text:
byte-level `bpe` (GPT-2's kind), `wordpiece` (BERT's pre-tokenizer, `##` continuations, spaces not
covered, so it does not give the text back) or `unigram` (SentencePiece's, with a Metaspace `▁`
for each space, lossless for the characters it was trained on). The step is keyed by these settings
and the prep step, so the distilled student and the no-teacher baseline share one, and the
teacher's cache (keyed by prep and the teacher) never depends on it.

Writes `tokenizer/` (a Hugging Face folder); the manifest's details give `vocab_size`, the
`special_token_ids` (bos, eos, pad) a student built for it uses, and `max_row_tokens`: its tokens
of the longest prepared row, start and end tokens included (the student's context).
"""

from __future__ import annotations

import tempfile

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from kd_core.config import StudentTokenizerConfig
from kd_core.data.cross_text import row_texts
from kd_core.data.shards import read_columns, split_shards
from kd_core.data.tokenizer import load_tokenizer
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import Store

SPECIAL_TOKENS = {
    "bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>", "unk": None},
    "wordpiece": {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]"},
    "unigram": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
}
"""The special tokens of each kind kdflow trains (the start, end, padding and unknown tokens)."""


def student_tokenizer_step(
    settings: StudentTokenizerConfig, prep: Manifest, store: Store, force: bool = False, *, field: str = "student.tokenizer.path",
    separates_documents: bool = True,
) -> Manifest:
    """The `student_tokenizer` step: keyed by `settings` (a folder's files' identity) and prep, run
    here or reused (announced as the pipeline's steps are); redone with `force`. `field` names the
    folder in errors; `separates_documents`: a loaded folder needs an end token."""
    from kd_core.data.tokenizer import tokenizer_identity
    from kd_core.progress import say

    section = {"path": settings.path, "identity": tokenizer_identity(settings.path, store.config)} if settings.path else settings.model_dump(mode="json", exclude={"path"})
    run = StageRun(store, "student_tokenizer", section, inputs={"prep": prep}, force=force)
    if run.reused:
        manifest = run.reused
    else:
        metrics, details = prepare_student_tokenizer(settings, prep, store, run, field=field, separates_documents=separates_documents)
        manifest = run.finish(metrics=metrics, details=details)
    state = "reused" if manifest.reused else f"done in {manifest.timings.get('total', 0):.1f}s"
    say(f"[green]✓[/green] student_tokenizer {manifest.key}  {state} ({manifest.details['kind']}, {manifest.details['vocab_size']:,} tokens)")
    return manifest


def prepare_student_tokenizer(
    config: StudentTokenizerConfig, prep: Manifest, store: Store, run: StageRun, *, field: str = "student.tokenizer.path", separates_documents: bool = True,
) -> tuple[dict, dict]:
    """Load or train the student's tokenizer into `run`'s folder: (metrics, details)."""
    texts_of = {}
    for split in ("train", "val", "test"):
        columns = read_columns(store, split_shards(prep, split))
        texts_of[split] = row_texts(columns["text_bytes"], columns["text_length"])
    if config.path:
        prepared = load_tokenizer(config.path, store.config, field=field, separates_documents=separates_documents)
        wrapped = prepared.hf
        wrapped.pad_token = wrapped.pad_token or prepared.pad
        kind, trained_on = "folder", 0
    else:
        documents = texts_of["train"]
        with run.timed("train"):
            wrapped = trained_wrapped(config.kind, documents, config.vocab_size)
        kind, trained_on = config.kind, len(documents)
    with tempfile.TemporaryDirectory(prefix="kdflow-student-tokenizer-") as folder:
        wrapped.save_pretrained(folder)
        run.upload_dir(folder, "tokenizer")
    longest = 0  # the student's tokens of the longest prepared row, its start and end tokens included
    for split_texts in texts_of.values():
        encodings = wrapped.backend_tokenizer.encode_batch(split_texts, add_special_tokens=False) if split_texts else []
        longest = max([longest, *(len(encoding.ids) + 2 for encoding in encodings)])
    return (
        {"vocab_size": len(wrapped), "trained_on_rows": trained_on, "max_row_tokens": longest},
        {"vocab_size": len(wrapped), "special_token_ids": special_ids(wrapped), "kind": kind, "max_row_tokens": longest},
    )


def special_ids(tokenizer) -> dict[str, int]:
    """A student tokenizer's start, end and pad ids (a missing start token: its end token; a
    missing pad: its end token), as the step records them and eval reads a model folder's."""
    bos = tokenizer.bos_token or tokenizer.eos_token or tokenizer.pad_token
    return {
        "bos": tokenizer.convert_tokens_to_ids(bos), "eos": tokenizer.convert_tokens_to_ids(tokenizer.eos_token or tokenizer.pad_token),
        "pad": tokenizer.convert_tokens_to_ids(tokenizer.pad_token or tokenizer.eos_token),
    }


def trained_wrapped(kind: str, documents: list[str], vocab_size: int):
    """`trained`, as a transformers tokenizer with the kind's special tokens."""
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[kind]
    return PreTrainedTokenizerFast(
        tokenizer_object=trained(kind, documents, vocab_size), bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"],
        unk_token=special["unk"] or special["eos"],
    )


def trained(kind: str, documents: list[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of `kind` trained on `documents`, `vocab_size` tokens with its special ones."""
    special = [token for token in dict.fromkeys(SPECIAL_TOKENS[kind].values()) if token]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    else:
        # No normalizer and no "▁" put before the text: the tokens give the text back exactly (with
        # one, leading spaces were lost), so bits per byte count all of it.
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer
