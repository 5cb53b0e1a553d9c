"""The preflight (`kdflow validate --deep`): does this teacher teach this student on this data?

Each check returns `CheckResult`s (name, status, one line naming the fields or files and what to
do); the CLI prints them as a table and exits 2 when any failed. Statuses: `pass`; `info` (fine,
but worth knowing: a padded output layer); `skip` (does not apply to this job, or cannot run
before prep: the message says which); `warn` (trains, but probably not as meant); `fail` (a hard
mismatch: the job would train on the wrong thing or crash).

Cheap checks (`cheap_checks`: config, tokenizer files and config.json, never weights or torch;
`kdflow run` runs them before any stage and refuses to start on a failure):

- **temperatures** (`temperature_check`): `cache.temperature` against `distill.loss.temperature`.
  Sampled draws and top-k log-probs with the tail bucket are at the cache temperature, so the loss
  must use it (the job config refuses a mismatch too). A `full` cache is re-tempered exactly: the
  decoder multiplies the cached log-probs by the cache temperature, which gives the teacher's
  logits up to a per-position constant, and the loss divides them by its own. Top-k without the
  tail (`topk_tail: false`) renormalises the cached log-probs at the loss temperature: the teacher
  is then effectively at cache.temperature × loss.temperature, which is the loss temperature only
  when the cache is at 1.
- **vocabulary** (`vocabulary_checks`, `compare_vocabularies`): a pretrained student
  (`student.init: pretrained`) against the data tokenizer (`data.tokenizer`: the teacher's): the
  token -> id maps (added tokens included), the student's output layer (config.json `vocab_size`)
  against the tokenizer, and the eos / bos / pad tokens. A student built from config or cut from
  the teacher reads the data tokenizer's ids by construction.

Deep checks (`deep_checks`: they load the tokenizers, the teacher and the student, and read the
first `records` records of the data; they import torch):

- **teacher output layer**: the teacher's config.json `vocab_size` against the data tokenizer;
- **template** (`data.source: chat`; `template_check`): the first records rendered through the
  teacher's and the student's tokenizers (`ChatEncoder`, with `data.chat.template` when set), text
  and token ids compared; the first record that differs is named with the first differing
  characters;
- **determinism** (`determinism_check`): two float32 forward passes of the teacher (eval mode,
  no_grad) on the same rows agree within `DETERMINISM_TOLERANCE` in log-probs;
- **loss** (`loss_check`): on one batch of the data made as prep makes it, kdflow's objective
  (`DistillationObjective.from_config(distill.loss)`, through the training step, with the teacher's
  targets as training gets them: dense logits online, or through the cache's encoder and decoder)
  against `reference_loss`, an independent float64 computation of CE + s·KD. Relative difference
  above `LOSS_TOLERANCE` fails.

It sits beside `kd_core.checks` (the CLI's input checks): it calls into the library and nothing in
the library calls it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from kd_core.config import CHAT_SOURCES, CacheConfig, LossConfig, StorageConfig
from kd_core.errors import InputError
from kd_core.job import JobConfig
from kd_core.tasks import task_named

STATUSES = ("pass", "info", "skip", "warn", "fail")
DETERMINISM_TOLERANCE = 1e-4
"""Largest max |Δ log-prob| between two teacher forward passes on the same rows (float32)."""
LOSS_TOLERANCE = 1e-4
"""Largest relative difference between kdflow's loss and the float64 reference."""
RECORDS = 8
"""Records (chat) or documents (text) the deep checks read by default."""
SPECIAL_TOKENS = ("eos", "bos", "pad")
LANGUAGE_MODEL_SOURCES = ("python-docs", "files", *CHAT_SOURCES)
"""The data the deep checks read: token rows of text or chat (not preference pairs)."""
ONLINE_SOURCES = ("online", "on_policy")
"""Teacher sources whose targets are the teacher's logits on the batch (no cache)."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    """One of STATUSES; only `fail` stops a run."""
    message: str

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [result for result in results if result.status == "fail"]


def cheap_checks(job: JobConfig) -> list[CheckResult]:
    """The checks `kdflow run` makes before any stage: config, tokenizer files, config.json."""
    own = task_named(job.task).preflight_checks(job, RECORDS, deep=False)
    if own is not None:
        return [CheckResult(*row) for row in own]
    if job.data.source not in LANGUAGE_MODEL_SOURCES:
        return [CheckResult("preflight", "skip", f"data.source {job.data.source}: the checks are for language models on text or chat records")]
    return [temperature_check_of(job), *vocabulary_checks(job, deep=False)]


# ---------------------------------------------------------------------------------- temperatures
def temperature_check_of(job: JobConfig) -> CheckResult:
    cache, loss = job.cache, job.distill.loss
    return temperature_check(
        cache.format, cache.temperature, loss.temperature, topk_tail=loss.topk_tail, teacher_source=job.distill.teacher_source,
        kd_weight=loss.kd_weight,
    )


def temperature_check(
    cache_format: str, cache_temperature: float, loss_temperature: float, *, topk_tail: bool, teacher_source: str, kd_weight: float
) -> CheckResult:
    """The temperature rule of the module docstring, stated with the job's values."""
    name, values = "temperatures", f"cache.temperature {cache_temperature}, distill.loss.temperature {loss_temperature}"
    if kd_weight == 0:
        return CheckResult(name, "pass", "distill.loss.kd_weight is 0: no KD term, the temperatures do not matter")
    if teacher_source in ONLINE_SOURCES:
        return CheckResult(name, "pass", f"online teacher: its logits are tempered at distill.loss.temperature ({loss_temperature}); cache.temperature is unused")
    exact = cache_format == "sampled" or (cache_format == "topk" and topk_tail)
    if exact:
        stored = "the draws are" if cache_format == "sampled" else "the top-k log-probs with their tail are"
        if cache_temperature != loss_temperature:
            return CheckResult(name, "fail", f"{values}: {stored} at the cache temperature, so the loss must use it; set both to one value")
        return CheckResult(name, "pass", f"{values}: {stored} at the loss temperature")
    if cache_format == "full":
        if cache_temperature == loss_temperature:
            return CheckResult(name, "pass", f"{values}: the full cache is at the loss temperature")
        return CheckResult(
            name, "info",
            f"{values}: the full cache's log-probs × cache.temperature are the teacher's logits up to a constant, so the loss "
            "re-tempers them exactly (within the float16 rounding of the cached log-probs)",
        )
    effective = cache_temperature * loss_temperature
    if cache_temperature == 1:
        return CheckResult(name, "pass", f"{values}: top-k without the tail renormalises a temperature-1 cache at the loss temperature")
    return CheckResult(
        name, "warn",
        f"{values}: with distill.loss.topk_tail false the cached top-k log-probs (already at {cache_temperature}) are divided by "
        f"the loss temperature again, so the teacher is effectively at {effective:g} while the student is at {loss_temperature}; "
        "set cache.temperature: 1 (or topk_tail: true and equal temperatures)",
    )


# ------------------------------------------------------------------------------------ vocabulary
@dataclass(frozen=True)
class TokenizerFacts:
    """What the vocabulary checks compare of a tokenizer folder (and the model beside it)."""

    url: str
    vocabulary: dict[str, int]
    """token -> id, added tokens included."""
    special: dict[str, str | None]
    """eos, bos, pad -> the token (None: not declared)."""
    output_size: int | None = None
    """config.json's `vocab_size` in the folder (None: no config.json)."""


def tokenizer_facts(url: str, storage: StorageConfig, field: str) -> TokenizerFacts:
    """A tokenizer folder's facts (transformers' tokenizer, no torch); `field` names it in errors."""
    from kd_core.data.tokenizer import load_tokenizer

    hf = load_tokenizer(url, storage, separates_documents=False, field=field).hf
    special = {name: getattr(hf, f"{name}_token") for name in SPECIAL_TOKENS}
    return TokenizerFacts(url, dict(hf.get_vocab()), special, model_vocab_size(url, storage))


def model_vocab_size(url: str, storage: StorageConfig) -> int | None:
    """config.json's `vocab_size` (or its `text_config`'s) in a model folder; None without one."""
    from kd_core.storage import url_to_fs

    fs, root = url_to_fs(url, storage)
    path = f"{root.rstrip('/')}/config.json"
    if not fs.exists(path):
        return None
    settings = json.loads(fs.cat_file(path))
    return settings.get("vocab_size") or settings.get("text_config", {}).get("vocab_size")


def vocabulary_checks(job: JobConfig, *, deep: bool) -> list[CheckResult]:
    """The student's vocabulary against the data tokenizer's; with `deep`, the teacher's output layer too."""
    results = []
    if job.student.init != "pretrained":
        results.append(CheckResult(
            "vocabulary", "pass",
            f"student.init: {job.student.init}: the student is built for the data tokenizer's vocabulary and shares it",
        ))
    elif not job.student.path:
        results.append(CheckResult("vocabulary", "fail", "student.path: unset, but student.init is pretrained; point it at the student's Hugging Face folder"))
    elif not job.data.tokenizer:
        results.append(CheckResult(
            "vocabulary", "fail",
            "data.tokenizer: unset (and no teacher.path), so kdflow would train a new tokenizer that the pretrained student at "
            f"{job.student.path} cannot read; set data.tokenizer to the tokenizer the teacher and the student share",
        ))
    else:
        try:
            data = tokenizer_facts(job.data.tokenizer, job.storage, "data.tokenizer")
            student = tokenizer_facts(job.student.path, job.storage, "student.path")
        except InputError as err:
            return [CheckResult("vocabulary", "fail", str(err))]
        results += compare_vocabularies(data, student)
    if deep and job.teacher.path and job.data.tokenizer:
        results.append(teacher_output_check(job))
    return results


def compare_vocabularies(data: TokenizerFacts, student: TokenizerFacts) -> list[CheckResult]:
    """A pretrained student's tokenizer and output layer against the data tokenizer (the teacher's)."""
    return [_token_ids(data, student), output_layer_check("student output layer", "student.path", student.url, student.output_size, len(data.vocabulary)),
            _special_tokens(data, student)]


def _token_ids(data: TokenizerFacts, student: TokenizerFacts) -> CheckResult:
    differing = sorted(
        (token for token in data.vocabulary.keys() | student.vocabulary.keys() if data.vocabulary.get(token) != student.vocabulary.get(token)),
        key=lambda token: (data.vocabulary.get(token, math.inf), student.vocabulary.get(token, math.inf)),
    )
    if not differing:
        return CheckResult("vocabulary", "pass", f"student.path: the same {len(data.vocabulary):,} tokens with the same ids as data.tokenizer")
    shown = ", ".join(f"{token!r} {_id(data, token)} vs {_id(student, token)}" for token in differing[:4])
    return CheckResult(
        "vocabulary", "fail",
        f"student.path: {len(differing):,} tokens have other ids than in data.tokenizer ({data.url}), e.g. {shown} (data vs student); "
        "the student must read the teacher's token ids: use a student trained with the teacher's tokenizer",
    )


def _id(facts: TokenizerFacts, token: str) -> str:
    return str(facts.vocabulary[token]) if token in facts.vocabulary else "absent"


def output_layer_check(name: str, field: str, url: str, output_size: int | None, tokens: int) -> CheckResult:
    """A model's output rows (config.json `vocab_size`) against the data tokenizer's `tokens`."""
    if output_size is None:
        return CheckResult(name, "fail", f"{field}: {url} has no config.json with a vocab_size; point it at a Hugging Face model folder")
    if output_size < tokens:
        return CheckResult(
            name, "fail",
            f"{field}: the output layer has {output_size:,} rows (config.json vocab_size) but the data tokenizer {tokens:,} tokens: "
            "ids past it cannot be predicted; use a model made for this tokenizer",
        )
    if output_size > tokens:
        return CheckResult(
            name, "info",
            f"{field}: the output layer is padded ({output_size:,} rows for {tokens:,} tokens); the logits past the tokenizer "
            "are never a token and are cut before the softmax",
        )
    return CheckResult(name, "pass", f"{field}: {output_size:,} output rows, one per token of the data tokenizer")


def _special_tokens(data: TokenizerFacts, student: TokenizerFacts) -> CheckResult:
    differing = {name: (data.special[name], student.special[name]) for name in SPECIAL_TOKENS if data.special[name] != student.special[name]}
    if not differing:
        return CheckResult("special tokens", "pass", f"student.path: eos, bos and pad as in data.tokenizer ({data.special['eos']!r} ends a turn)")
    shown = "; ".join(f"{name} {ours!r} vs {theirs!r}" for name, (ours, theirs) in differing.items())
    if "eos" in differing:
        return CheckResult(
            "special tokens", "fail",
            f"student.path: {shown} (data.tokenizer vs student): the student would learn to end with a token its own tokenizer "
            "does not stop at; give the student folder the teacher's eos_token (tokenizer_config.json)",
        )
    return CheckResult("special tokens", "warn", f"student.path: {shown} (data.tokenizer vs student); the registered student uses the data tokenizer's")


def teacher_output_check(job: JobConfig) -> CheckResult:
    try:
        data = tokenizer_facts(job.data.tokenizer, job.storage, "data.tokenizer")
    except InputError as err:
        return CheckResult("teacher output layer", "fail", str(err))
    return output_layer_check("teacher output layer", "teacher.path", job.teacher.path, model_vocab_size(job.teacher.path, job.storage), len(data.vocabulary))


# ------------------------------------------------------------------------------------------ deep
def deep_checks(job: JobConfig, records: int = RECORDS) -> list[CheckResult]:
    """Every check, the deep ones on the first `records` records (module docstring); a task with a
    preflight of its own (`Task.preflight_checks`) runs that instead."""
    own = task_named(job.task).preflight_checks(job, records, deep=True)
    if own is not None:
        return [CheckResult(*row) for row in own]
    if job.data.source not in LANGUAGE_MODEL_SOURCES:
        return cheap_checks(job)
    results = [temperature_check_of(job), *vocabulary_checks(job, deep=True)]
    results.append(template_check_of(job, records) if job.data.source in CHAT_SOURCES else
                   CheckResult("template", "skip", f"data.source {job.data.source}: no chat template is used"))
    if not job.teacher.path:
        reason = "no teacher.path: kdflow trains the teacher, which does not exist before the run"
        return [*results, CheckResult("determinism", "skip", reason), CheckResult("loss", "skip", reason)]
    try:
        batch = sample_batch(job, records)
    except InputError as err:  # the template or the records: reported by the checks above, or --check-inputs
        reason = f"no batch of the data to run on: {err}"
        return [*results, CheckResult("determinism", "skip", reason), CheckResult("loss", "skip", reason)]
    try:
        teacher, student = load_models(job)
    except (InputError, OSError, ValueError) as err:  # transformers raises OSError or ValueError for a folder it cannot load
        reason = f"teacher.path or student.path does not load: {err}"
        return [*results, CheckResult("determinism", "fail", reason), CheckResult("loss", "fail", reason)]
    results.append(determinism_check(teacher, batch))
    if any(result.status == "fail" and result.name in ("vocabulary", "student output layer") for result in results):
        results.append(CheckResult("loss", "skip", "the student's vocabulary differs from the data's (above): the loss would compare other tokens"))
    else:
        top_k = job.distill.on_policy.teacher_top_k if job.distill.teacher_source == "on_policy" else None
        result = loss_check(job.distill.loss, job.cache, job.distill.teacher_source, teacher, student, batch, vocabulary_size(job), top_k=top_k)
        if job.student.init == "from_teacher":  # the loss does not depend on the student's weights
            result = CheckResult(result.name, result.status, f"{result.message} (a student built from student.architecture stood in)")
        results.append(result)
    return results


def vocabulary_size(job: JobConfig) -> int:
    return len(tokenizer_facts(job.data.tokenizer, job.storage, "data.tokenizer").vocabulary)


# -------------------------------------------------------------------------------------- template
def template_check_of(job: JobConfig, records: int = RECORDS) -> CheckResult:
    """The data's first chat records through the teacher's (data.tokenizer) and the student's tokenizers."""
    from kd_core.data.chat import ChatEncoder
    from kd_core.data.tokenizer import load_tokenizer

    try:
        if job.data.tokenizer is None and job.data.source == "exact-answers":
            from kd_core.data.exact_answers import char_tokenizer

            teacher = ChatEncoder(char_tokenizer(job.data.chat.template), job.data.chat, "the exact-answers character tokenizer")
        else:
            teacher = ChatEncoder(load_tokenizer(job.data.tokenizer, job.storage).hf, job.data.chat, job.data.tokenizer)
        conversations = job_conversations(job, records)
    except InputError as err:
        return CheckResult("template", "fail", str(err))
    student = teacher
    if job.student.init == "pretrained" and job.student.path and job.student.path != job.data.tokenizer:
        try:
            student = ChatEncoder(load_tokenizer(job.student.path, job.storage, separates_documents=False, field="student.path").hf, job.data.chat, job.student.path)
        except InputError as err:  # its message names data.tokenizer's settings, which apply to the student's tokenizer too
            return CheckResult("template", "fail", f"student.path's tokenizer: {err}")
    return compare_renderings(conversations, teacher, student, "data.tokenizer", "student.path" if student is not teacher else "data.tokenizer")


def job_conversations(job: JobConfig, records: int) -> list:
    """The job's first `records` conversations: the bundled pairs' or its files' (`first_conversations`)."""
    from kd_core.data.chat import chat_settings, conversation_of, first_conversations
    from kd_core.data.sources import FileSource

    if job.data.source == "python-qa":
        from kd_core.data.python_qa import python_qa_pairs

        pairs = python_qa_pairs(job.data.seed)[:records]
        return [conversation_of(pair, f"python-qa pair {number}", job.data.chat) for number, pair in enumerate(pairs, start=1)]
    if job.data.source == "exact-answers":
        from kd_core.data.exact_answers import exact_answer_pairs

        data = job.data
        pairs = exact_answer_pairs(data.exact_answers, data.seed, data.val_fraction, data.test_fraction)[:records]
        return [conversation_of(pair, f"exact-answers pair {number}", chat_settings(data)) for number, pair in enumerate(pairs, start=1)]
    return first_conversations(FileSource(job.data.files, job.data.text_field, job.storage), job.data.chat, records)


def compare_renderings(conversations: list, teacher, student, teacher_name: str, student_name: str) -> CheckResult:
    """Each conversation rendered and tokenized by two `ChatEncoder`s (`student` may be `teacher`
    itself): the first that differs (text, then token ids), or that a template cannot render as its
    turns one after another (ChatEncoder's error, naming the record)."""
    for conversation in conversations:
        encoded = {}
        for name, encoder in ((teacher_name, teacher), (student_name, student))[: 1 if student is teacher else 2]:
            try:
                encoded[name] = list(encoder.encode(conversation)[0])
            except InputError as err:
                return CheckResult("template", "fail", f"{name}'s template: {err}")
        if student is teacher:
            continue
        teacher_text, student_text = teacher.render(conversation), student.render(conversation)
        if teacher_text != student_text:
            return CheckResult(
                "template", "fail",
                f"{conversation.where}: {teacher_name} and {student_name} render this conversation differently, "
                f"{first_difference(teacher_text, student_text)}; give one template to both in data.chat.template",
            )
        teacher_ids, student_ids = encoded[teacher_name], encoded[student_name]
        if teacher_ids != student_ids:
            at = next((i for i, (a, b) in enumerate(zip(teacher_ids, student_ids)) if a != b), min(len(teacher_ids), len(student_ids)))
            return CheckResult(
                "template", "fail",
                f"{conversation.where}: the same text tokenizes differently from token {at} on ({teacher_name} "
                f"{teacher_ids[at:at + 3]} vs {student_name} {student_ids[at:at + 3]}); the student needs the teacher's tokenizer",
            )
    both = "one tokenizer for teacher and student" if student is teacher else f"{teacher_name} and {student_name} agree"
    return CheckResult("template", "pass", f"the first {len(conversations)} conversations render as their turns in order; {both}")


def first_difference(first: str, second: str, context: int = 12) -> str:
    """'at character i: ...first... vs ...second...' around where two texts first differ."""
    at = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    start = max(0, at - context)
    return f"at character {at}: {first[start:at + context]!r} vs {second[start:at + context]!r}"


# ----------------------------------------------------------------------------- batch and models
def sample_batch(job: JobConfig, records: int = RECORDS) -> dict:
    """One batch as prep makes it from the first `records` records or documents: `input_ids`
    (chat: also `position_ids`, `loss_mask`) as int64 tensors (rows, data.seq_len)."""
    import numpy as np
    import torch

    from kd_core.data.tokenizer import load_tokenizer

    prepared = load_tokenizer(job.data.tokenizer, job.storage)
    if job.data.source in CHAT_SOURCES:
        from kd_core.data.chat import ChatEncoder, fit_to_rows

        encoder = ChatEncoder(prepared.hf, job.data.chat, job.data.tokenizer)
        encoded = [(ids[: job.data.seq_len], trained[: job.data.seq_len]) for ids, trained in map(encoder.encode, job_conversations(job, records))]
        columns = fit_to_rows([pair for pair in encoded if pair[1].any()], job.data.seq_len, job.data.chat.layout, prepared.ids()["pad"])
    else:
        from kd_core.data.prep import file_source, pack
        from kd_core.data.sources import SourceCounts, python_docs

        source = file_source(job.data, job.storage)
        documents = python_docs() if source is None else source.documents(SourceCounts())
        columns = {"input_ids": pack(prepared.tokenizer, itertools.islice(documents, records), job.data.seq_len, prepared.ids()["eos"])[:records]}
    if len(columns["input_ids"]) == 0:
        raise InputError(f"data: the first {records} records hold no row of data.seq_len={job.data.seq_len} tokens with a trained token")
    return {name: torch.from_numpy(values.astype(np.int64)) for name, values in columns.items()}


def load_models(job: JobConfig):
    """(teacher, student) in float32, eval mode: the teacher from teacher.path; the student from
    student.path (`init: pretrained`), else built from student.architecture for the data's
    vocabulary (a stand-in for one cut from the teacher: the loss does not depend on its weights)."""
    from kd_core.data.tokenizer import load_tokenizer
    from kd_core.models import build_causal_lm, load_causal_lm

    teacher = load_causal_lm(local_model_dir(job.teacher.path, job.storage))
    if job.student.init == "pretrained":
        return teacher, load_causal_lm(local_model_dir(job.student.path, job.storage))
    prepared = load_tokenizer(job.data.tokenizer, job.storage)
    student = build_causal_lm(job.student.architecture, len(prepared.hf), job.data.seq_len, seed=job.distill.train.seed, special_ids=prepared.ids())
    return teacher, student.eval()


def local_model_dir(url: str, storage: StorageConfig) -> Path:
    """A local folder holding the model at `url` (downloaded once into the kdflow cache)."""
    from fsspec.implementations.local import LocalFileSystem

    from kd_core.models import CACHE_ROOT
    from kd_core.storage import download_folder, url_to_fs

    fs, root = url_to_fs(url, storage)
    if isinstance(fs, LocalFileSystem):
        return Path(root)
    target = CACHE_ROOT / "preflight" / hashlib.sha256(url.encode()).hexdigest()[:20]
    return download_folder(fs, root, target, source=url)


def model_inputs(batch: dict) -> dict:
    """A causal LM's inputs for the batch, written out here (not `kd_core.models.sequence_inputs`,
    which the loss check tests): the ids, chat rows' restarting position ids, and no KV cache
    (with one, Hugging Face models do not keep packed conversations apart)."""
    return {"input_ids": batch["input_ids"], "use_cache": False} | ({"position_ids": batch["position_ids"]} if "position_ids" in batch else {})


# ---------------------------------------------------------------------------------- determinism
def determinism_check(model, batch: dict, tolerance: float = DETERMINISM_TOLERANCE) -> CheckResult:
    """Two forward passes of `model` (eval mode, no_grad, float32 log-probs) on `batch`'s rows."""
    import torch

    model.eval()
    inputs = model_inputs(batch)
    with torch.no_grad():
        first, second = (torch.log_softmax(model(**inputs).logits.float(), dim=-1) for _ in range(2))
    difference = float((first - second).abs().max())
    rows = len(batch["input_ids"])
    if not difference <= tolerance:  # NaN fails too
        return CheckResult(
            "determinism", "fail",
            f"teacher.path: two forward passes on the same {rows} rows differ by up to {difference:.3g} in log-probs "
            f"(tolerance {tolerance:g}): its forward is not deterministic in eval mode (dropout that ignores eval(), random "
            "noise), so the cache and the online teacher would give other targets each run; fix the model's forward",
        )
    return CheckResult("determinism", "pass", f"teacher.path: two forward passes on {rows} rows agree (max |Δ log-prob| {difference:.3g} ≤ {tolerance:g})")


# ----------------------------------------------------------------------------------------- loss
def loss_check(
    loss: LossConfig, cache: CacheConfig, teacher_source: str, teacher, student, batch: dict, vocab_size: int, *, step=None,
    tolerance: float = LOSS_TOLERANCE, top_k: int | None = None,
) -> CheckResult:
    """kdflow's loss on `batch` against `reference_loss`. `step(batch, targets) -> {'loss': ...}`
    is what training runs (default: `CausalLMStep` with `DistillationObjective.from_config(loss)`,
    fused when `loss.fused`); the feature term is left out (it has learned projections of its own).
    `top_k`: an on-policy teacher scores with its top k (`distill.on_policy.teacher_top_k`)."""
    import torch

    from kd_core.losses import DistillationObjective
    from kd_core.tasks.causal_lm_step import CausalLMStep

    loss = loss.model_copy(update={"feature_weight": 0.0})
    targets = teacher_targets(teacher, batch, vocab_size, cache, teacher_source, top_k, loss.temperature)
    if step is None:
        objective = DistillationObjective.from_config(loss, student_hidden_size=None, teacher_hidden_size=None).train()  # train: balance_terms starts its running magnitudes
        step = CausalLMStep(student, objective, loss.fused_chunk_size if loss.fused else None, vocab_size=vocab_size)
    try:
        with torch.no_grad():
            terms = {name: float(value) for name, value in step(batch, targets).items()}
            student_logits = student(**model_inputs(batch)).logits
        reference = reference_terms(student_logits, batch["input_ids"], batch.get("loss_mask"), targets, loss, vocab_size)
    except (ValueError, RuntimeError, IndexError) as err:
        return CheckResult("loss", "fail", f"distill.loss: the loss could not be computed on a real batch: {err}")
    ours, expected = terms["loss"], reference["loss"]
    difference = abs(ours - expected) / max(abs(expected), 1e-12)
    where = f"distill.loss ({describe_loss(loss, cache, teacher_source, top_k)})"
    shown = lambda values: f"{values['loss']:.6g}" + "".join(f", {name.upper()} {values[name]:.4g}" for name in ("ce", "kd") if name in values)  # noqa: E731
    if not difference <= tolerance:
        return CheckResult(
            "loss", "fail",
            f"{where}: kdflow's loss {shown(terms)} differs from the float64 reference {shown(reference)} by {difference:.2g} "
            f"(relative; tolerance {tolerance:g}); the objective does not compute what the config says: report it with this job",
        )
    return CheckResult("loss", "pass", f"{where}: kdflow {shown(terms)}; float64 reference {shown(reference)} (relative difference {difference:.2g})")


def describe_loss(loss: LossConfig, cache: CacheConfig, teacher_source: str, top_k: int | None = None) -> str:
    online = teacher_source in ONLINE_SOURCES
    source = ("online teacher" + (f", its top {top_k}" if top_k else "")) if online else f"{cache.format} cache"
    kd = loss.divergence if online or cache.format != "sampled" else "forward KL"
    return f"{source}, {kd}, T={loss.temperature:g}" + (", fused" if loss.fused else "")


def teacher_targets(teacher, batch: dict, vocab_size: int, cache: CacheConfig, teacher_source: str, top_k: int | None = None, temperature: float = 1.0):
    """The `TeacherTargets` training would get for `batch`: the teacher's logits cut to the data's
    vocabulary (online; with `top_k`, its top k at `temperature`), or them through the cache's
    encoder and decoder (`CacheLayout`)."""
    import torch

    from kd_core.cache.format import CacheLayout
    from kd_core.losses import TeacherTargets
    from kd_core.models.inference import teacher_forward

    input_ids = batch["input_ids"]
    with torch.no_grad():
        forward = teacher_forward(teacher.eval(), input_ids, [], position_ids=batch.get("position_ids"))
        logits = forward.logits(slice(None)).unflatten(0, input_ids.shape)[..., :vocab_size].float()
    if teacher_source in ONLINE_SOURCES:  # an on-policy run's dataset batches are scored this way too
        return TeacherTargets(logits=logits).top_k(top_k, temperature) if top_k else TeacherTargets(logits=logits)
    layout = CacheLayout.from_config(cache, input_ids.shape[1], vocab_size)
    columns = layout.encode(torch.log_softmax(logits / layout.temperature, dim=-1), torch.Generator().manual_seed(cache.seed), {})
    return TeacherTargets.from_batch({name: torch.from_numpy(values) for name, values in layout.decode(columns).items()})


def reference_loss(student_logits, input_ids, loss_mask, targets, loss: LossConfig, vocab_size: int) -> float:
    """The total of `reference_terms`."""
    return reference_terms(student_logits, input_ids, loss_mask, targets, loss, vocab_size)["loss"]


def reference_terms(student_logits, input_ids, loss_mask, targets, loss: LossConfig, vocab_size: int) -> dict[str, float]:
    """{'loss': ce_weight·CE + kd_weight·b·s·KD, 'ce': CE, 'kd': KD (with targets)} in float64,
    written apart from `kd_core.losses`.

    Position t predicts token t + 1. Chat rows (`loss_mask` (B, T), one per token): t counts for
    CE and KD when token t + 1 is trained on; text rows: CE counts every t < T − 1 and KD every t
    (the last position's teacher distribution exists, its next token does not). The student's
    logits (B, T, V') are cut to the data's `vocab_size`. KD per position, with p = teacher,
    q = student, both at T = loss.temperature: the configured divergence of dense logits
    (forward KL Σ p log p/q; reverse KL Σ q log q/p; generalized JSD β·KL(p‖m) + (1−β)·KL(q‖m),
    m = βp + (1−β)q; skew KLs KL(p‖αp + (1−α)q), KL(q‖αq + (1−α)p); total variation ½Σ|p − q|),
    or against top-k targets: forward KL (with the tail bucket 1 − Σ, or renormalised over the k
    ids at T), any other divergence over the k ids and the tail bucket; or forward KL against
    sampled targets (the draws' frequencies). s = T² when scale_by_temperature_squared;
    b = CE / KD with balance_terms (the first step's running magnitudes); teacher_confidence
    weights 1 − H/log V, rescaled to mean 1 over the counted positions."""
    import torch

    logits = student_logits.double()[..., :vocab_size]
    batch, length, _ = logits.shape
    if loss_mask is None:
        ce_counted = torch.ones(batch, length, dtype=torch.bool)
        ce_counted[:, -1] = False
        kd_counted = torch.ones(batch, length, dtype=torch.bool)
    else:
        ce_counted = torch.zeros(batch, length, dtype=torch.bool)
        ce_counted[:, :-1] = loss_mask[:, 1:].bool()
        kd_counted = ce_counted
    log_q1 = torch.log_softmax(logits, dim=-1)
    next_ids = input_ids.roll(-1, dims=1).clamp(0, vocab_size - 1)  # the last column is never counted
    ce_each = -log_q1.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    ce = _mean(ce_each, ce_counted)
    has_targets = targets.logits is not None or targets.topk_logprobs is not None or targets.sample_ids is not None
    if not has_targets or loss.kd_weight == 0:
        return {"loss": loss.ce_weight * ce if has_targets else ce, "ce": ce}
    temperature = loss.temperature
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    kd_each = _kd_per_position(log_q, targets, loss)
    if loss.token_weighting == "teacher_confidence":
        weights = (1 - targets.entropy.double() / math.log(vocab_size)).clamp_min(0)
        kd_each = kd_each * weights / max(_mean(weights, kd_counted), 1e-6)
    kd = _mean(kd_each, kd_counted)
    scale = temperature**2 if loss.scale_by_temperature_squared else 1.0
    balance = ce / max(kd, 1e-8) if loss.balance_terms else 1.0
    return {"loss": loss.ce_weight * ce + loss.kd_weight * balance * scale * kd, "ce": ce, "kd": kd}


def _mean(values, counted) -> float:
    return float(values[counted].sum() / max(int(counted.sum()), 1))


def _kl(log_p, log_q):
    """Σ p (log p − log q) over the last dimension, 0·log 0 = 0."""
    import torch

    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _kd_per_position(log_q, targets, loss: LossConfig):
    import torch

    if targets.logits is not None:
        return _divergence(torch.log_softmax(targets.logits.double() / loss.temperature, dim=-1), log_q, loss)
    if targets.sample_ids is not None:
        counts = targets.sample_counts.double()
        log_p = torch.log(counts / counts.sum(-1, keepdim=True).clamp_min(1))
        return _kl(log_p, log_q.gather(-1, targets.sample_ids.long()))
    log_q_at_ids = log_q.gather(-1, targets.topk_ids.long())
    log_p = targets.topk_logprobs.double()
    if not loss.topk_tail:
        return _kl(torch.log_softmax(log_p / loss.temperature, dim=-1), log_q_at_ids)
    p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - log_q_at_ids.exp().sum(-1)).clamp_min(1e-30)
    if loss.divergence != "forward_kl":  # the top k and the tail bucket as two distributions
        with_tail = lambda head, tail: torch.cat([head, torch.log(tail.clamp_min(1e-30)).unsqueeze(-1)], -1)  # noqa: E731
        return _divergence(with_tail(log_p, p_tail), with_tail(log_q_at_ids, q_tail), loss)
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-300)) - torch.log(q_tail)), 0.0)
    return _kl(log_p, log_q_at_ids) + tail


def _divergence(log_p, log_q, loss: LossConfig):
    """The configured divergence of teacher p and student q, per position (last dimension: outcomes)."""
    import torch

    p, q = log_p.exp(), log_q.exp()
    parameter = loss.divergence_parameter
    if loss.divergence == "forward_kl":
        return _kl(log_p, log_q)
    if loss.divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if loss.divergence == "generalized_jsd":
        beta = 0.5 if parameter is None else parameter
        if beta in (0, 1):
            return _kl(log_p, log_q) if beta == 0 else _kl(log_q, log_p)
        log_m = torch.log(beta * p + (1 - beta) * q)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if loss.divergence in ("skew_forward_kl", "skew_reverse_kl"):
        alpha = 0.1 if parameter is None else parameter
        first, second = (log_p, log_q) if loss.divergence == "skew_forward_kl" else (log_q, log_p)
        return _kl(first, torch.log(alpha * first.exp() + (1 - alpha) * second.exp()))
    if loss.divergence == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"the reference has no {loss.divergence!r}")
