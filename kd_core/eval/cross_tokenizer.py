"""Held-out measurements of models with different tokenizers (`task: cross_tokenizer`).

Perplexities of models with different tokenizers do not compare: a token is a different amount of
text for each. Every model is measured on the same held-out rows, each tokenized by its own
tokenizer (the teacher: the prepared view; a student: its model folder's tokenizer), and its
summed next-token NLL is divided by the text it predicts:
- `bits_per_byte` = NLL / ln 2 / the rows' UTF-8 bytes, `bits_per_character` per character;
  every token after a row's start token is predicted, its document's end token included, so each
  model pays for all the text (a tokenizer that drops characters, e.g. WordPiece's spaces,
  pays for less of it and looks better than it is);
- `cross_entropy`: nats per own token, `tokens_per_byte`: how finely the tokenizer cuts;
- `span_agreement` (students): at the first position of each span the two tokenizations share,
  whether the model's most likely next token is the teacher's, compared as normalised strings
  (`kd_core/data/alignment.py`; the end-of-document token is the same outcome on both sides);
- `round_trip`: the share of held-out rows whose tokens decode to the row's text exactly; below 1,
  the model's bits per byte count less than all of the text and do not compare with the others';
- `parameters`, `weight_bytes`, `bytes_per_s` (held-out text through a forward pass per second,
  after one untimed warm-up pass) and `latency_ms` (the median forward pass of the first
  `throughput_batches` batches of `batch_size` rows).
"""

from __future__ import annotations

import math
import statistics
import time

from kd_core.data.alignment import normalised, token_pieces
from kd_core.data.cross_text import row_texts
from kd_core.data.shards import read_columns, split_shards
from kd_core.data.student_tokenizer import special_ids
from kd_core.data.views import StudentView, numpy_rows, teacher_view, token_nll
from kd_core.eval import synchronize, parameter_bytes
from kd_core.models import count_parameters, load_causal_lm, model_copy
from kd_core.models.teacher import teacher_model_dir
from kd_core.progress import progress_bar


def measure_across_tokenizers(config, prep, teacher, student, baseline, store, device) -> tuple[dict, dict]:
    """({rows, bytes, characters} of the held-out split, each model's metrics). The teacher goes
    first: its most likely next token per batch is what the students' agreement compares with."""
    from transformers import PreTrainedTokenizerFast

    columns = read_columns(store, split_shards(prep, config.split), config.max_rows)
    texts = row_texts(columns["text_bytes"], columns["text_length"])
    total_bytes, characters = int(columns["text_length"].sum()), sum(len(text) for text in texts)
    folders = {"teacher": teacher_model_dir(store, teacher), "student": model_copy(store, student)}
    if baseline is not None:
        folders["baseline"] = model_copy(store, baseline)
    scores, teacher_argmax, teacher_pieces = {}, [], None
    with progress_bar("eval: bits per byte", total=len(folders) * len(texts)) as bar:
        for name, folder in folders.items():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
            pieces = role_pieces(tokenizer)
            view_of = teacher_view if name == "teacher" else StudentView(folder, special_ids(tokenizer))
            model = load_causal_lm(folder).to(device).eval()
            token_nll(model, view_of(numpy_rows(columns, 0, config.batch_size, device)), len(tokenizer))  # warm-up, untimed
            nats, tokens, agreed, spans, seconds, latencies = 0.0, 0, 0, 0, 0.0, []
            for index, start in enumerate(range(0, len(texts), config.batch_size)):
                batch = numpy_rows(columns, start, start + config.batch_size, device)
                view = view_of(batch)
                synchronize(device)
                began = time.perf_counter()
                nll, counted, argmax = token_nll(model, view, len(tokenizer))
                synchronize(device)
                elapsed = time.perf_counter() - began
                latencies, seconds = (latencies + [elapsed])[: config.throughput_batches], seconds + elapsed
                nats, tokens = nats + float(nll.sum()), tokens + int(counted.sum())
                if name == "teacher":
                    teacher_argmax.append(argmax)
                elif len(view.spans):
                    agreed += agreement(view, argmax, teacher_argmax[index], pieces, teacher_pieces)
                    spans += len(view.spans)
                bar.advance(len(batch["input_ids"]))
            if name == "teacher":
                teacher_pieces = pieces
            scores[name] = {
                "bits_per_byte": nats / math.log(2) / max(total_bytes, 1),
                "bits_per_character": nats / math.log(2) / max(characters, 1),
                "cross_entropy": nats / max(tokens, 1),
                "tokens_per_byte": tokens / max(total_bytes, 1),
                **({"span_agreement": agreed / max(spans, 1)} if name != "teacher" else {}),
                "parameters": count_parameters(model),
                "weight_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")) or parameter_bytes(model),
                "round_trip": sum(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text for text in texts) / max(len(texts), 1),
                "bytes_per_s": total_bytes / max(seconds, 1e-9),
                "latency_ms": 1000 * statistics.median(latencies),
            }
    return {"rows": len(texts), "bytes": total_bytes, "characters": characters}, scores


def role_pieces(tokenizer) -> list[str | None]:
    """Each id's normalised string for agreement (a token of whitespace alone: that whitespace, so
    a space is a space on both sides), the end token as a name every side shares."""
    pieces = [None if piece is None else normalised(piece) or f"<whitespace {piece!r}>" for piece in token_pieces(tokenizer)]
    if tokenizer.eos_token is not None:
        pieces[tokenizer.convert_tokens_to_ids(tokenizer.eos_token)] = "<end of document>"
    return pieces


def agreement(view, argmax, teacher_argmax, pieces: list, teacher_pieces: list) -> int:
    """Spans whose first predicting position's most likely token is the teacher's (as strings)."""
    spans = view.spans
    mine = argmax[spans.rows, spans.student_start].tolist()
    theirs = teacher_argmax[spans.rows, spans.teacher_start].tolist()
    return sum(
        a < len(pieces) and b < len(teacher_pieces) and pieces[a] is not None and pieces[a] == teacher_pieces[b]
        for a, b in zip(mine, theirs, strict=True)
    )
