"""Aligning two tokenizations of one text by character offsets (`kd_core/data/alignment.py`).

Real tokenizers of three kinds are trained here on a few paragraphs (byte-level BPE, WordPiece,
Unigram), and every pair of them tokenizes texts with whitespace runs, tabs, newlines, accents,
CJK and emoji. For each pair the spans must partition both token sequences in order, and the
characters (other than whitespace) a span's teacher tokens cover must be exactly those its student
tokens cover. Hand-written offsets pin the edge cases: tokens that cross each other's boundaries,
gaps, byte pieces of one character, zero-width tokens with and without a partner.
Run: .venv/bin/python -m pytest tests/test_alignment.py
"""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kd_core.data.alignment import SharedVocabulary, span_text, token_pieces, token_spans

CORPUS = [
    "Knowledge distillation trains a small student to mimic a large teacher.",
    "The teacher's tokenizer and the student's differ: distillation, distilling, distilled.",
    "def tokenize(text):\n\treturn [piece for piece in text.split()]  # naïve café",
    "日本語のテキストと emoji 😀 mixed with ASCII, numbers 12345 and    spaces.",
] * 20

TEXTS = [
    "Distillation of a teacher into a student.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n  indented",
    "naïve café déjà vu",
    "日本語 and emoji 😀😀 side by side",
    "unseen words: zygomorphic quixotry",
    "def f(x):\n    return x ** 2",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[SEP]")


def unigram() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {"bpe": byte_level_bpe(), "wordpiece": wordpiece(), "unigram": unigram()}


def offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    return [tuple(pair) for pair in tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]]


def covered(text: str, token_offsets) -> set[int]:
    return {position for start, end in token_offsets for position in range(start, end) if not text[position].isspace()}


@pytest.mark.parametrize("teacher_kind,student_kind", list(itertools.permutations(["bpe", "wordpiece", "unigram"], 2)))
def test_spans_partition_both_sequences_and_cover_the_same_characters(tokenizers, teacher_kind, student_kind):
    multi_token_spans = 0
    for text in TEXTS:
        teacher, student = offsets(tokenizers[teacher_kind], text), offsets(tokenizers[student_kind], text)
        spans = token_spans(teacher, student)
        assert [span[0] for span in spans] == [0, *[span[1] for span in spans[:-1]]] and spans[-1][1] == len(teacher)
        assert [span[2] for span in spans] == [0, *[span[3] for span in spans[:-1]]] and spans[-1][3] == len(student)
        for first_teacher, teacher_end, first_student, student_end in spans:
            assert teacher_end > first_teacher and student_end > first_student
            assert covered(text, teacher[first_teacher:teacher_end]) == covered(text, student[first_student:student_end]), text
            multi_token_spans += (teacher_end - first_teacher > 1) or (student_end - first_student > 1)
    assert multi_token_spans > 0  # the tokenizers really differ


def test_tokens_crossing_boundaries_gaps_and_split_characters_make_one_span_each():
    text = "abcd efg"
    # "ab" | "cd" against "a" | "bc" | "d": no common boundary inside "abcd"; then " efg" (with its
    # space) against "e" | "fg" (the space a gap on the student's side).
    assert token_spans([(0, 2), (2, 4), (4, 8)], [(0, 1), (1, 3), (3, 4), (5, 6), (6, 8)]) == [(0, 2, 0, 3), (2, 3, 3, 5)]
    assert span_text(text, [(0, 2), (2, 4), (4, 8)], [(0, 1), (1, 3), (3, 4), (5, 6), (6, 8)], (2, 3, 3, 5)) == " efg"
    # two byte-level pieces of one character report the same offsets: one span with the whole
    assert token_spans([(0, 1), (0, 1), (1, 2)], [(0, 2)]) == [(0, 3, 0, 1)]
    # a shared boundary splits
    assert token_spans([(0, 3), (3, 5)], [(0, 1), (1, 3), (3, 5)]) == [(0, 1, 0, 2), (1, 2, 2, 3)]


def test_zero_width_tokens_pair_with_their_partner_or_join_the_next_span():
    # a row's start token and a document's end token on both sides: spans of their own
    assert token_spans([(0, 0), (0, 3), (3, 3)], [(0, 0), (0, 2), (2, 3), (3, 3)]) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]
    # a start token on one side only joins the first span
    assert token_spans([(0, 0), (0, 3)], [(0, 3)]) == [(0, 2, 0, 1)]
    # an end token on one side only joins the last span
    assert token_spans([(0, 3), (3, 3)], [(0, 3)]) == [(0, 2, 0, 1)]


def test_shared_vocabulary_matches_normalised_strings_and_never_special_tokens(tokenizers):
    bpe, pieces = tokenizers["bpe"], token_pieces(tokenizers["wordpiece"])
    assert pieces[tokenizers["wordpiece"].convert_tokens_to_ids("[SEP]")] is None
    continuation = next(index for token, index in tokenizers["wordpiece"].get_vocab().items() if token.startswith("##") and len(token) > 3)
    assert not pieces[continuation].startswith("##")
    shared = SharedVocabulary.of(token_pieces(bpe), pieces)
    assert shared.teacher_shared[bpe.convert_tokens_to_ids("<|endoftext|>")] == -1
    for letter in "abc":  # single letters are in both vocabularies: with and without a space, one index
        index = shared.teacher_shared[bpe.convert_tokens_to_ids(letter)]
        assert index >= 0 and shared.strings[index] == letter
        assert shared.student_shared[tokenizers["wordpiece"].convert_tokens_to_ids(letter)] == index
    spaced = bpe.convert_tokens_to_ids("Ġa")
    assert shared.teacher_shared[spaced] == shared.teacher_shared[bpe.convert_tokens_to_ids("a")]
    teacher_share, student_share = shared.overlap()
    assert 0 < teacher_share < 1 and 0 < student_share < 1
