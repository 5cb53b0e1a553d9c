"""Cross-tokenizer prep's rows (`kd_core/data/cross_text.py`): text kept with the teacher's view.

A byte-level BPE trained here cuts documents (accents, CJK, emoji, whitespace runs) into rows; the
rows of each document, joined, give the document back exactly; each row's teacher tokens decode
to its text and their offsets slice it; the start and end tokens sit where the docstring says.
Run: .venv/bin/python -m pytest tests/test_cross_text.py
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import processors

from kd_core.data.cross_text import row_texts, text_rows
from kd_core.data.tokenizer import train_tokenizer

DOCUMENTS = [
    "Knowledge distillation trains a small student to mimic a large teacher. " * 6,
    "naïve café déjà vu — 日本語のテキスト 😀😀 and\ttabs\n\n   and spaces   ",
    "short",
]


@pytest.mark.parametrize("trimmed", [False, True], ids=["offsets as they are", "trim_offsets"])
def test_rows_give_each_document_back_and_their_tokens_their_text(trimmed):
    """With `trim_offsets` (GPT-2-style tokenizer.json files), a whitespace token's offsets are
    zero-width: it still counts, in its row and in the text it decodes to."""
    prepared = train_tokenizer(DOCUMENTS * 4, 300)
    if trimmed:
        prepared.tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    ids = prepared.ids()
    columns = text_rows(prepared, DOCUMENTS, seq_len=16)
    texts = row_texts(columns["text_bytes"], columns["text_length"])
    assert len(texts) > len(DOCUMENTS)  # the long document needs several rows
    ends = columns["ends_document"][:, 0].astype(bool)
    assert ends.sum() == len(DOCUMENTS)
    joined, document = [], []
    for text, end in zip(texts, ends, strict=True):
        document.append(text)
        if end:
            joined.append("".join(document))
            document = []
    assert joined == DOCUMENTS
    for row, text in enumerate(texts):
        count = int(columns["tokens"][row, 0])
        assert 2 <= count <= 16
        view = columns["input_ids"][row]
        assert view[0] == ids["bos"] and (view[count:] == ids["pad"]).all()
        last = count - 1 if ends[row] else count
        if ends[row]:
            assert view[last] == ids["eos"] and columns["offset_start"][row, last] == columns["offset_end"][row, last] == len(text)
        assert prepared.tokenizer.decode(view[1:last].tolist()) == text
        starts, stops = columns["offset_start"][row, 1:last], columns["offset_end"][row, 1:last]
        assert starts[0] == 0 and (stops >= starts).all() and (np.diff(starts) >= 0).all()
        assert stops[-1] == len(text) or (trimmed and not text[stops[-1]:].strip())
        assert columns["text_length"][row, 0] == len(text.encode())
