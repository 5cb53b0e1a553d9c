"""A batch of cross-tokenizer rows (`kd_core/data/cross_text.py`) as each model reads it.

- `teacher_view`: the prepared rows, the teacher's tokens;
- `StudentView`: the rows' texts tokenized by a student's tokenizer, with the spans that align
  them to the teacher's view (`kd_core/data/alignment.py`), as the loss reads them
  (`kd_core.losses.cross_tokenizer.AlignedSpans`: predicting positions);
- `token_nll`: a model's summed next-token NLL per row on a view (bits per byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core.data.alignment import token_spans
from kd_core.data.cross_text import row_texts
from kd_core.losses.cross_tokenizer import AlignedSpans


@dataclass
class ViewBatch:
    """One batch in a model's own tokens: `input_ids` (B, L) padded with pad, `lengths` (B,) real
    tokens per row, `spans` aligned with the teacher's view (None for the teacher's own view)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    spans: AlignedSpans | None = None

    def predicting(self) -> torch.Tensor:
        """(B, L) bool: the positions that predict a real token (position t predicts t + 1)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return positions.unsqueeze(0) < (self.lengths.unsqueeze(1) - 1)


def teacher_view(batch: dict[str, torch.Tensor]) -> ViewBatch:
    """The prepared rows as the teacher reads them."""
    return ViewBatch(batch["input_ids"].long(), batch["tokens"].reshape(-1).long())


class StudentView:
    """Tokenizes a batch's row texts with the student's tokenizer: its start token (zero-width at
    0), the text's tokens, its end token where the row ends a document, padded; then aligns them
    with the teacher's view by offsets. A row is as long as its text needs (the student tokenizer
    step records the longest, `max_row_tokens`, which the student's context covers)."""

    def __init__(self, tokenizer_dir: str | Path, special_ids: dict[str, int]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.special_ids = special_ids

    def __call__(self, batch: dict[str, torch.Tensor]) -> ViewBatch:
        columns = {name: batch[name].cpu().numpy() for name in ("text_bytes", "text_length", "offset_start", "offset_end", "tokens", "ends_document")}
        texts = row_texts(columns["text_bytes"], columns["text_length"])
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        rows, spans = [], []
        for row, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
            pieces = list(zip(encoding.ids, encoding.offsets, strict=True))  # a zero-width real token counts too
            ends = bool(columns["ends_document"][row, 0])
            view = [(self.special_ids["bos"], (0, 0)), *pieces, *([(self.special_ids["eos"], (len(text), len(text)))] if ends else [])]
            count = int(columns["tokens"][row, 0])
            teacher = list(zip(columns["offset_start"][row, :count].tolist(), columns["offset_end"][row, :count].tolist(), strict=True))
            rows.append([token for token, _ in view])
            student = [pair for _, pair in view]
            for first_teacher, teacher_end, first_student, student_end in token_spans(teacher, student):
                if first_teacher == 0 or first_student == 0:
                    continue  # the row's start tokens (or a span joined with them): nothing predicts them
                spans.append((row, first_teacher - 1, teacher_end - 1, first_student - 1, student_end - 1))
        width = max([len(ids) for ids in rows] + [2])
        input_ids = torch.full((len(rows), width), self.special_ids["pad"], dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        table = torch.tensor(spans, dtype=torch.long).reshape(-1, 5)
        device = batch["input_ids"].device
        aligned = AlignedSpans(rows=table[:, 0], teacher_start=table[:, 1], teacher_end=table[:, 2], student_start=table[:, 3], student_end=table[:, 4])
        return ViewBatch(input_ids.to(device), torch.tensor([len(ids) for ids in rows], device=device), aligned.to(device))


@torch.no_grad()
def token_nll(model, view: ViewBatch, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token NLL in nats over the tokens the row predicts (every token
    after the start token, the end token included), their count; and the argmax token per
    position (B, L)."""
    logits = model(input_ids=view.input_ids).logits[..., :vocab_size].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    nll = -next_token_logprobs(logprobs, view.input_ids)
    predicting = view.predicting()
    return torch.where(predicting, nll, 0.0).sum(1), predicting.sum(1), logits.argmax(-1)


def numpy_rows(columns: dict[str, np.ndarray], start: int, stop: int, device) -> dict[str, torch.Tensor]:
    """Rows start..stop of prepared columns as a batch on `device` (the stream's dtypes)."""
    return {name: torch.from_numpy(values[start:stop]).to(device) for name, values in columns.items()}


def next_token_logprobs(logprobs: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L): position t's log-prob of token t + 1 (the last position's: of itself, never read)."""
    following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    return logprobs.gather(-1, following.unsqueeze(-1)).squeeze(-1)
