"""The embedding task's preflight (`kdflow validate --deep`; `Task.preflight_checks`): what the
teacher and the student are, and whether the texts, the teacher and the objective work together.

Cheap (before every `kdflow run` too): the teacher folder's encoder, pooling, normalisation and
width, read from its small JSON files; the student's blocks and width, and the Matryoshka widths
against it. Deep, on the first `records` documents: the texts prep would cut and how many
`data.seq_len` cuts short; the teacher's embeddings of up to `SAMPLE_TEXTS` of them (finite, and
not all alike); the objective on them with the student the job would build (finite, each term).

Rows are (check, status, message), as `kd_core.preflight.CheckResult` takes them.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from kd_core.errors import InputError

SAMPLE_TEXTS = 32
"""Texts the deep checks run the teacher and the objective on."""
ALIKE = 0.95
"""A teacher whose embeddings of different texts have a mean cosine above this barely tells them apart."""
DESCRIPTION_FILES = ("config.json", "modules.json", "sentence_bert_config.json")


def teacher_description(job) -> tuple[dict, object]:
    """(the teacher folder's config.json, its `SentenceSettings`), from its small JSON files only.
    A teacher kdflow trains: its config from `teacher.architecture`, mean pooling, normalised."""
    import json

    from kd_core.models.encoders import SentenceSettings, read_sentence_config
    from kd_core.models.teacher import check_model_context, teacher_files
    from kd_core.storage import reaching, url_to_fs

    if job.teacher.path is None:
        arch = job.teacher.architecture
        return {"model_type": "bert", "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size}, SentenceSettings("mean", True, None)
    fs, root = url_to_fs(job.teacher.path, job.storage)
    root = root.rstrip("/")
    with reaching(job.teacher.path, "teacher.path"), tempfile.TemporaryDirectory(prefix="kdflow-teacher-") as folder:
        local = Path(folder)
        teacher_files(fs, root, job.teacher.path)  # safetensors weights and a config.json, or an error that says what to do
        names = [name for name in DESCRIPTION_FILES if fs.exists(f"{root}/{name}")]
        for name in names:
            (local / name).write_bytes(fs.cat_file(f"{root}/{name}"))
        if "modules.json" in names:  # the module folders' configs (pooling, projection), small files too
            for module in json.loads((local / "modules.json").read_text()):
                if module.get("path") and fs.exists(f"{root}/{module['path']}/config.json"):
                    (local / module["path"]).mkdir(parents=True, exist_ok=True)
                    (local / module["path"] / "config.json").write_bytes(fs.cat_file(f"{root}/{module['path']}/config.json"))
        config = json.loads((local / "config.json").read_text())
        check_model_context(config, job.teacher.path, job.data.seq_len)
        settings = read_sentence_config(local)
        if settings.dense_folder is not None:
            config["kdflow_output_dim"] = json.loads((local / settings.dense_folder / "config.json").read_text())["out_features"]
    return config, settings


def cheap_rows(job) -> list[tuple[str, str, str]]:
    """The teacher and the student, described; Matryoshka widths checked against the student's."""
    try:
        config, settings = teacher_description(job)
    except (InputError, OSError, ValueError) as err:
        return [("teacher", "fail", str(err))]
    from kd_core.models.encoders import encoder_width

    try:
        teacher_width = config.get("kdflow_output_dim") or encoder_width(config)
    except ValueError as err:
        return [("teacher", "fail", f"teacher.path: {job.teacher.path}: {err}")]
    problem = settings.reading_problem(job.data.seq_len, "the teacher")
    if problem:
        return [("teacher", "fail", problem)]
    where = job.teacher.path or "trained here from teacher.architecture"
    rows = [("teacher", "pass", (
        f"{where}: {config.get('model_type', '?')}, {blocks(config)} blocks, {settings.pooling} pooling"
        f"{', a projection' if settings.dense_folder else ''}, {'normalised' if settings.normalize else 'not normalised'}, {teacher_width} dimensions"
    ))]
    student = job.student
    if student.init == "from_teacher":
        try:
            layers = student.from_teacher.kept_layers(blocks(config))
        except ValueError as err:
            return [*rows, ("student", "fail", str(err))]
        width = student.embedding.output_dim or teacher_width
        described = f"blocks {layers} of the teacher's {blocks(config)}, its pooling, {width} dimensions"
    elif student.init == "pretrained":
        return [*rows, pretrained_row(job)]
    else:
        width = student.embedding.output_dim or student.architecture.hidden_size
        described = f"a BERT of {student.architecture.num_layers} blocks, {student.architecture.hidden_size} wide, {student.embedding.pooling} pooling, {width} dimensions"
    too_wide = [dim for dim in job.distill.embedding.matryoshka_dims if dim > width]
    if too_wide:
        return [*rows, ("student", "fail", f"{described}; distill.embedding.matryoshka_dims {too_wide} exceed its width")]
    loss = job.distill.embedding
    projected = width != teacher_width and (loss.mse_weight or loss.cosine_weight or loss.contrastive_weight)
    rows.append(("student", "pass", described + (f"; MSE, cosine and contrastive terms compare it through a learned {width}→{teacher_width} projection" if projected else "")))
    if student.init == "config" and loss.mse_weight and not projected and student.embedding.normalize != settings.normalize:
        rows.append(("normalisation", "warn", (
            f"student.embedding.normalize is {student.embedding.normalize} but the teacher's embeddings are {'' if settings.normalize else 'not '}normalised: "
            f"MSE to them cannot reach 0 at the same width; set student.embedding.normalize: {str(settings.normalize).lower()}"
        )))
    return rows


def pretrained_row(job) -> tuple[str, str, str]:
    """A student from another encoder folder: safetensors weights, a config.json and its own
    tokenizer (it reads the texts in its own tokens)."""
    from kd_core.models.students import pretrained_identity
    from kd_core.storage import Store, url_to_fs

    url = job.student.path
    try:
        files, _ = pretrained_identity(url, Store(job.storage))
        fs, root = url_to_fs(url, job.storage)
        if f"{root.rstrip('/')}/tokenizer.json" not in files:
            return "student", "fail", f"student.path: {url} has no tokenizer.json; the student reads the texts with its own tokenizer: save it beside the model"
    except (InputError, OSError, ValueError) as err:
        return "student", "fail", str(err)
    return "student", "pass", f"student.path: {url}: its own pooling and tokenizer (it reads the texts in its own tokens)"


def blocks(config: dict) -> int:
    """An encoder's number of blocks from its config.json (BERT's `num_hidden_layers`, DistilBERT's `n_layers`)."""
    return int(config.get("num_hidden_layers", config.get("n_layers", 0)))


def deep_rows(job, records: int) -> list[tuple[str, str, str]]:
    """The texts, the teacher's embeddings and the objective on the first `records` documents."""
    import numpy as np

    try:
        total, texts, cut, encoded = sample_texts(job, records)
    except (InputError, OSError, ValueError) as err:
        return [("texts", "fail", str(err))]
    rows = [("texts", "pass" if texts else "fail", (
        f"{total:,} texts of at least {job.data.texts.min_chars} characters from the first {records} documents; "
        f"{cut:.0%} reach data.seq_len={job.data.seq_len} tokens and are cut there"
    ) if texts else f"no text of at least data.texts.min_chars={job.data.texts.min_chars} characters in the first {records} documents")]
    if not texts or job.teacher.path is None:
        return rows + ([("teacher embeddings", "skip", "the teacher is trained by the pipeline; nothing to run yet")] if texts else [])
    try:
        teacher, student, objective = models_for(job)
        embeddings = teacher(*encoded).detach()
    except (InputError, OSError, ValueError, RuntimeError) as err:
        return [*rows, ("teacher embeddings", "fail", str(err))]
    finite = bool(np.isfinite(embeddings.numpy()).all())
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    mean_cosine = float((similarity.sum() - similarity.diagonal().sum()) / max(len(texts) * (len(texts) - 1), 1))
    status = "fail" if not finite else "warn" if mean_cosine > ALIKE else "pass"
    rows.append(("teacher embeddings", status, (
        f"{len(texts)} texts -> {tuple(embeddings.shape)}; " + ("non-finite values: the teacher's weights are broken" if not finite else
        f"mean cosine between different texts {mean_cosine:.2f}" + (": nearly all alike, its neighbours say little" if mean_cosine > ALIKE else ""))
    )))
    if not finite:
        return rows
    if objective is None:
        return [*rows, ("loss", "skip", "student.path: a student from another encoder folder reads the texts in its own tokens; the objective runs in training")]
    values = {name: float(value.detach()) for name, value in objective(student(*encoded), embeddings).items()}
    status = "pass" if all(np.isfinite(list(values.values()))) else "fail"
    rows.append(("loss", status, "untrained student: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items())))
    return rows


def sample_texts(job, records: int):
    """(how many texts the first `records` documents give, up to `SAMPLE_TEXTS` of them, the share
    of all that reach data.seq_len, the sample's (input ids, attention mask) as prep would tokenize it)."""
    import torch

    from kd_core.data.embedding_text import document_texts, text_columns
    from kd_core.data.tokenizer import load_tokenizer, train_tokenizer
    from kd_core.tasks.cross_tokenizer_preflight import first_documents

    documents = first_documents(job, records)
    texts = list(dict.fromkeys(itertools.chain.from_iterable(document_texts(document, job.data.texts) for document in documents)))
    if not texts:
        return 0, [], 0.0, None
    prepared = load_tokenizer(job.data.tokenizer, job.storage, separates_documents=False) if job.data.tokenizer else train_tokenizer(documents, job.data.vocab_size)
    columns = text_columns(prepared, texts, job.data.seq_len)
    cut = float(columns["truncated"].mean())
    sample = slice(0, SAMPLE_TEXTS)
    lengths = torch.as_tensor(columns["tokens"][sample, 0]).long()
    ids = torch.as_tensor(columns["input_ids"][sample, : int(lengths.max())]).long()
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return len(texts), texts[sample], cut, (ids, mask)


def models_for(job):
    """(the teacher encoder, the student the job would start from and its objective; both None for a
    student from another encoder folder) for the deep checks: the teacher folder is fetched whole
    (a download for a remote one)."""
    from kd_core.losses.embedding import EmbeddingObjective
    from kd_core.models.encoders import build_sentence_encoder, started_from

    teacher = fetched_encoder(job.teacher.path, "teacher.path", job)
    student_settings = job.student.embedding
    if job.student.init == "from_teacher":
        layers = job.student.from_teacher.kept_layers(teacher.config.num_hidden_layers)
        student = started_from(teacher, layers, student_settings.output_dim, 0, job.data.seq_len)
    elif job.student.init == "pretrained":  # it reads the texts in its own tokens, not the sample's
        return teacher, None, None
    else:
        pad = teacher.config.pad_token_id or 0
        student = build_sentence_encoder(
            job.student.architecture, teacher.config.vocab_size, job.data.seq_len, pad_id=pad, seed=0, pooling=student_settings.pooling,
            normalize=student_settings.normalize, output_dim=student_settings.output_dim,
        )
    return teacher, student.eval(), EmbeddingObjective.from_config(job.distill.embedding, student.dimension, teacher.dimension)


def fetched_encoder(url: str, field: str, job):
    """The sentence encoder in the folder at `url` (`field` names it in errors), fetched whole."""
    from kd_core.models.encoders import load_sentence_encoder
    from kd_core.storage import reaching, url_to_fs

    fs, root = url_to_fs(url, job.storage)
    with reaching(url, field), tempfile.TemporaryDirectory(prefix="kdflow-encoder-") as folder:
        fs.get(root.rstrip("/") + "/", folder, recursive=True)
        return load_sentence_encoder(Path(folder)).eval()
