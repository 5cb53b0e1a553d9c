"""The cross_tokenizer task's preflight (`kdflow validate --deep`; `Task.preflight_checks`): do the
teacher's and the student's tokenizers align on this data, and which losses apply?

Rows are (check, status, message), as `kd_core.preflight.CheckResult` takes them.
"""

from __future__ import annotations

import itertools

from kd_core.errors import InputError

TRAINING_DOCUMENTS = 200
"""Documents a tokenizer kdflow would train is trained on here, standing in for prep's."""
LOW_OVERLAP = 0.1
"""Below this share of the student's vocabulary shared with the teacher's, span-aligned KL
compares little but the merged spans (most mass falls to ULD)."""


def method_row(job) -> tuple[str, str, str]:
    """Which of ULD, span-aligned KL and DSKD the job's teacher source allows, and the one chosen."""
    online = job.distill.teacher_source == "online"
    allowed = ["uld", "span_kl", *(["dskd"] if online else [])]
    source = "an online teacher" if online else f"the {job.cache.format} cache"
    chosen = job.distill.cross_tokenizer.method
    status = "pass" if chosen in allowed else "fail"
    return "losses", status, f"from {source}: {', '.join(allowed)} apply; distill.cross_tokenizer.method is {chosen}"


def student_tokenizer_row(job) -> tuple[str, str, str]:
    """The student's tokenizer folder, when one is named, loads (before any stage runs)."""
    from kd_core.data.tokenizer import load_tokenizer

    settings = job.student.tokenizer
    if not settings.path:
        return "student tokenizer", "pass", f"student.tokenizer: a {settings.kind} of {settings.vocab_size:,} tokens, trained on the prepared text"
    try:
        tokens = len(load_tokenizer(settings.path, job.storage, field="student.tokenizer.path").hf)
    except (InputError, OSError, ValueError) as err:
        return "student tokenizer", "fail", str(err)
    return "student tokenizer", "pass", f"student.tokenizer.path: {settings.path} ({tokens:,} tokens)"


def deep_rows(job, records: int) -> list[tuple[str, str, str]]:
    from kd_core.data.alignment import SharedVocabulary, token_pieces, token_spans

    try:
        documents = first_documents(job, max(records, TRAINING_DOCUMENTS))
    except (InputError, OSError, ValueError) as err:
        return [("data", "fail", str(err))]
    try:
        teacher, teacher_named = tokenizer_for(job.teacher.path or job.data.tokenizer, "teacher", job, documents)
        student, student_named = tokenizer_for(job.student.tokenizer.path, "student", job, documents)
        mismatch = data_tokenizer_mismatch(job, teacher)
    except (InputError, OSError, ValueError) as err:
        return [("tokenizers", "fail", str(err))]
    if mismatch:
        return [("tokenizers", "fail", mismatch)]
    rows = [("tokenizers", "info", f"teacher: {teacher_named}; student: {student_named}")]
    shared = SharedVocabulary.of(token_pieces(teacher), token_pieces(student))
    teacher_share, student_share = shared.overlap()
    overlap_status = "warn" if job.distill.cross_tokenizer.method == "span_kl" and student_share < LOW_OVERLAP else "pass"
    rows.append((
        "vocabulary overlap", overlap_status,
        f"{len(shared.strings):,} strings in both vocabularies (compared without surrounding spaces, so ' def' and 'def' are "
        f"one; special tokens and pieces of a character match nothing): they are {teacher_share:.1%} of the teacher's "
        f"{len(teacher):,} tokens and {student_share:.1%} of the student's {len(student):,}" + (
            f"; below {LOW_OVERLAP:.0%}, span_kl compares little but merged spans: consider method uld" if overlap_status == "warn" else ""
        ),
    ))
    one_to_one, total, example = 0, 0, None
    for text in documents[:records]:
        teacher_tokens = teacher(text, return_offsets_mapping=True, add_special_tokens=False)
        student_tokens = student(text, return_offsets_mapping=True, add_special_tokens=False)
        for first_t, end_t, first_s, end_s in token_spans(teacher_tokens["offset_mapping"], student_tokens["offset_mapping"]):
            total += 1
            if end_t - first_t == 1 and end_s - first_s == 1:
                one_to_one += 1
            elif example is None:
                example = (
                    teacher.convert_ids_to_tokens(teacher_tokens["input_ids"][first_t:end_t]),
                    student.convert_ids_to_tokens(student_tokens["input_ids"][first_s:end_s]),
                )
    shown = f"; e.g. teacher {example[0]} against student {example[1]}" if example else ""
    rows.append(("aligned spans", "pass" if total else "fail",
                 f"{total:,} spans in the first {min(records, len(documents))} documents, {one_to_one / max(total, 1):.1%} one token on both sides{shown}"))
    for name, tokenizer in (("teacher", teacher), ("student", student)):
        lossy = next(filter(None, (round_trip_difference(tokenizer, text) for text in documents[:records])), None)
        if lossy is None:
            rows.append((f"{name} round trip", "pass", f"the {name}'s tokens give the first documents back exactly: bits per byte count all of the text"))
        else:
            rows.append((f"{name} round trip", "warn",
                         f"the {name}'s tokens do not give every document back ({lossy}): characters it drops cost it nothing, "
                         "so its bits per byte are lower than they would be and do not compare with the others'"))
    return rows


def round_trip_difference(tokenizer, text: str, context: int = 15) -> str | None:
    """Where a text decoded from its tokens first differs from it, shown on both sides; None when equal."""
    back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    if back == text:
        return None
    at = next((index for index, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    return f"{text[max(0, at - context) : at + context]!r} comes back as {back[max(0, at - context) : at + context]!r}"


def data_tokenizer_mismatch(job, teacher) -> str | None:
    """With both `teacher.path` and `data.tokenizer`, the data must be tokenized as the teacher reads it."""
    from kd_core.data.tokenizer import load_tokenizer

    if not (job.teacher.path and job.data.tokenizer):
        return None
    data = load_tokenizer(job.data.tokenizer, job.storage).hf
    if data.get_vocab() == teacher.get_vocab():
        return None
    return (
        f"data.tokenizer: {job.data.tokenizer} is not the teacher's tokenizer ({len(data):,} tokens against the {len(teacher):,} of "
        f"teacher.path {job.teacher.path}); prepare the data with the teacher's: leave data.tokenizer unset or point it at {job.teacher.path}"
    )


def first_documents(job, count: int) -> list[str]:
    from kd_core.data.prep import file_source
    from kd_core.data.sources import SourceCounts, python_docs

    source = file_source(job.data, job.storage)
    documents = python_docs() if source is None else source.documents(SourceCounts())
    kept = [document for document in itertools.islice(documents, count) if document.strip()]
    if not kept:
        raise InputError("data: the first documents are empty; check data.files and data.text_field")
    return kept


def tokenizer_for(url: str | None, role: str, job, documents: list[str]):
    """(a transformers tokenizer, how it was found): the folder at `url`, or one trained on
    `documents` as kdflow would train it (the teacher's: a byte-level BPE of data.vocab_size; the
    student's: student.tokenizer's kind and size)."""
    from transformers import PreTrainedTokenizerFast

    from kd_core.data.tokenizer import END_OF_TEXT, PAD, load_tokenizer, train_tokenizer

    if url:
        field = "data.tokenizer" if role == "teacher" else "student.tokenizer.path"
        return load_tokenizer(url, job.storage, field=field).hf, url
    if role == "teacher":
        prepared = train_tokenizer(documents, job.data.vocab_size)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=prepared.tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD)
        return wrapped, f"a byte-level BPE of {job.data.vocab_size:,} trained on the first {len(documents)} documents (prep trains it on all)"
    from kd_core.data.student_tokenizer import trained_wrapped

    settings = job.student.tokenizer
    named = f"a {settings.kind} of {settings.vocab_size:,} trained on the first {len(documents)} documents (the student_tokenizer step trains it on all)"
    return trained_wrapped(settings.kind, documents, settings.vocab_size), named
