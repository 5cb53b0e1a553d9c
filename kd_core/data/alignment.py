"""Two tokenizations of one text, aligned by the characters their tokens cover (cross-tokenizer
distillation, `task: cross_tokenizer`).

A teacher and a student with different tokenizers read the same text. Each token has the
character offsets it covers, `(start, end)`, from a fast tokenizer's `return_offsets_mapping`.
`token_spans` groups the two token sequences into spans: the fewest consecutive tokens on each side
that cover the same characters. A span closes at a character boundary B (the furthest end of its
tokens on either side) once no token left on either side starts before B. So:

- a token split differently on each side ("distil" | "lation" against "distillation") makes one
  span of 2 teacher tokens and 1 student token; tokens that cross each other's boundaries
  ("ab" | "cd" against "a" | "bc" | "d") make one span of all of them;
- characters one side does not cover (WordPiece and Unigram drop spaces that byte-level BPE keeps in
  " def") are gaps that belong to no token: " def" (0, 4) and "def" (1, 4) make a 1:1 span;
- byte-level tokens that split one character between them report the same offsets and fall into
  one span;
- zero-width tokens (a special token kdflow puts at a row's start or a document's end, at offsets
  (p, p)) pair with the other side's zero-width token at p. A zero-width token with no partner
  joins the span that follows it.

`SharedVocabulary` maps each side's ids to the strings both vocabularies hold (after
normalisation), which the span-aligned KL compares one by one (`kd_core/losses/cross_tokenizer.py`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Offsets = Sequence[tuple[int, int]]


def token_spans(teacher: Offsets, student: Offsets) -> list[tuple[int, int, int, int]]:
    """The aligned spans of two tokenizations of one text, as token index ranges
    `(teacher_first, teacher_end, student_first, student_end)` (ends exclusive), in order; every
    token of both sides lies in exactly one span. Tokens must be in text order (each start at or
    after the previous token's start), as a tokenizer gives them."""
    spans: list[tuple[int, int, int, int]] = []
    i, j = 0, 0
    while i < len(teacher) and j < len(student):
        first_teacher, first_student = i, j
        boundary = max(teacher[i][1], student[j][1])
        i, j = i + 1, j + 1
        growing = True
        while growing:
            growing = False
            while i < len(teacher) and teacher[i][0] < boundary:
                boundary, i, growing = max(boundary, teacher[i][1]), i + 1, True
            while j < len(student) and student[j][0] < boundary:
                boundary, j, growing = max(boundary, student[j][1]), j + 1, True
        spans.append((first_teacher, i, first_student, j))
    if spans and (i < len(teacher) or j < len(student)):
        # tokens past the other side's last one (text only one side covers, a trailing special
        # token) join the last span
        teacher_first, _, student_first, _ = spans[-1]
        spans[-1] = (teacher_first, len(teacher), student_first, len(student))
    return spans


def span_text(text: str, teacher: Offsets, student: Offsets, span: tuple[int, int, int, int]) -> str:
    """The characters a span covers (from its first token's start on either side to its end)."""
    first_teacher, teacher_end, first_student, student_end = span
    covered = [*teacher[first_teacher:teacher_end], *student[first_student:student_end]]
    return text[min(start for start, _ in covered) : max(end for _, end in covered)]


def normalised(piece: str) -> str:
    """A token's string as the shared vocabulary compares it: NFKC, without surrounding spaces (a
    byte-level " def", a Unigram "▁def" and a WordPiece "def" are the same word start)."""
    return unicodedata.normalize("NFKC", piece).strip()


@dataclass(frozen=True)
class SharedVocabulary:
    """Each side's ids mapped to an index of a string both vocabularies hold (several ids of one
    side may share an index: " def" and "def" of a byte-level BPE), or -1."""

    teacher_shared: np.ndarray
    """(V_T,) int64: the shared index of each teacher id, or -1."""
    student_shared: np.ndarray
    """(V_S,) int64."""
    strings: tuple[str, ...]
    """The shared strings, by index."""

    @classmethod
    def of(cls, teacher_pieces: Sequence[str | None], student_pieces: Sequence[str | None]) -> SharedVocabulary:
        """From each id's surface string (`token_pieces`; None for a special token or a partial
        character, which match nothing)."""
        teacher_strings = [None if piece is None else normalised(piece) or None for piece in teacher_pieces]
        student_strings = [None if piece is None else normalised(piece) or None for piece in student_pieces]
        both = sorted(set(filter(None, teacher_strings)) & set(filter(None, student_strings)))
        index = {string: position for position, string in enumerate(both)}
        return cls(
            np.asarray([index.get(string, -1) if string else -1 for string in teacher_strings], dtype=np.int64),
            np.asarray([index.get(string, -1) if string else -1 for string in student_strings], dtype=np.int64),
            tuple(both),
        )

    def overlap(self) -> tuple[float, float]:
        """The share of each side's vocabulary (teacher, student) whose string the other holds."""
        return float((self.teacher_shared >= 0).mean()), float((self.student_shared >= 0).mean())


def token_pieces(tokenizer) -> list[str | None]:
    """The surface string of every id of a Hugging Face fast tokenizer, by id: the text the id
    decodes to alone (byte-level "Ġdef" -> " def", Metaspace "▁def" -> " def"), without a
    WordPiece continuation prefix ("##ing" -> "ing"). Special tokens, and byte-level pieces that are
    part of a character (decoding to U+FFFD), are None."""
    backend = tokenizer.backend_tokenizer
    model = backend.model
    prefix = getattr(model, "continuing_subword_prefix", None) or ""
    special = set(tokenizer.all_special_ids) | {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    vocabulary = backend.get_vocab(with_added_tokens=True)
    pieces: list[str | None] = [None] * max(len(tokenizer), max(vocabulary.values()) + 1)
    decoder = backend.decoder
    for token, index in vocabulary.items():
        if index in special:
            continue
        if prefix and token.startswith(prefix) and len(token) > len(prefix):
            token = token[len(prefix) :]
        piece = decoder.decode([token]) if decoder is not None else token
        pieces[index] = None if "\ufffd" in piece else piece
    return pieces
