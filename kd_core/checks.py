"""`kdflow validate --check-inputs`: are the job's inputs there and usable, before any work?

`check_inputs(config)` raises an `InputError` (one line naming the field and what to do) for the
first unusable input. It checks:

- `storage.root` on an object store: the bucket answers with the job's S3 settings and credentials;
- `data.files`: every URL, glob and folder matches files, and the first record of each (up to 20)
  reads as prep will read it (format, UTF-8, `data.text_field` holding a string);
- `data.tokenizer` (the teacher's folder when only `teacher.path` is set): it loads, and names no
  token it lacks;
- `teacher.path`: a folder with safetensors weights and a `config.json` whose context holds
  `data.seq_len` tokens;
- `student.path` (`student.init: pretrained`): the same (its vocabulary is checked against the
  prepared data before the teacher step);
- `registry.tracking_uri`: the MLflow server answers as MLflow and accepts kdflow's credentials,
  or the SQLite database's folder can be written (`kd_core.train.tracking_probe`).

Each check is quick (seconds) and reads nothing large: listings, at most the first megabyte of up to
20 data files, the tokenizer and `config.json`; never the weights. It sits beside the CLI's other helpers:
it calls into the library and nothing in the library calls it.
"""

from __future__ import annotations

from kd_core.job import JobConfig
from kd_core.train.tracking_probe import probe_tracking_uri, redact


def check_inputs(config: JobConfig) -> list[str]:
    """Run every input check; returns what was checked, one line each, for the CLI to print."""
    from kd_core.data.prep import check_prep_inputs
    from kd_core.models.teacher import check_model_folder
    from kd_core.storage import Store, check_object_store
    from kd_core.tasks import task_named

    checked = [line for line in [check_object_store(config.storage)] if line]
    if config.data.source in ("files", "chat", "preferences") or config.data.tokenizer:
        checked += check_prep_inputs(config.data, config.storage, separates_documents=task_named(config.task).separates_documents())
    if config.teacher.path:
        check_model_folder(config.teacher.path, Store(config.storage), config.data.seq_len)
        checked.append(f"teacher.path: {config.teacher.path} has safetensors weights and a context of at least data.seq_len")
    if config.student.init == "pretrained":
        from kd_core.models.students import StudentError

        check_model_folder(config.student.path, Store(config.storage), config.data.seq_len, "student.path", StudentError, "the student (student.path)")
        checked.append(f"student.path: {config.student.path} has safetensors weights and a context of at least data.seq_len")
    if config.student.tokenizer.path:
        from kd_core.data.tokenizer import load_tokenizer

        own = load_tokenizer(config.student.tokenizer.path, config.storage, field="student.tokenizer.path")
        checked.append(f"student.tokenizer.path: {config.student.tokenizer.path} ({len(own.hf):,} tokens)")
    probe_tracking_uri(config.registry.tracking_uri, config.registry.experiment)
    return [*checked, f"registry.tracking_uri: {redact(config.registry.tracking_uri)} is usable"]

