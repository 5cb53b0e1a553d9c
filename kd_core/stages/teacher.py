"""The teacher step of the cache stage: an existing model, or one kdflow trains and keeps.

- `teacher.path` set, `teacher.finetune` true: that model is checked the same way, then trained
  on the training split from its own weights (`teacher.train`; "teacher correction", for a
  teacher pretrained on other data) like a teacher kdflow trains; the key covers its identity.
- `teacher.path` set: the directory is used where it is. The step records its identity (the
  object store's ETags, or the sha256, of its weights, `config.json` and tokenizer files; a local
  file's hash is kept by size and modification time, so weights are not hashed on every run) so
  a changed teacher gives a new cache key. It checks, reading only `config.json` and the
  tokenizer, that the teacher reads the prepared data: the same full vocabulary (added tokens
  included) and a context of at least `data.seq_len` tokens.
- `teacher.path` unset: kdflow trains the teacher from `teacher.architecture`, through the same
  loop and Ray Train workers as students, on what the task trains a teacher on (a language
  model: cross-entropy on the training split; a reward model: Bradley–Terry on the human labels
  of the pairs' text view). The result is stored under its key and reused by every later run
  with the same data and config. It checkpoints like a student (`distill.checkpoint_every`,
  `keep_checkpoints`, `resume`), so a teacher run that stops midway continues from its latest
  checkpoint.

The helpers that find and read a recorded teacher live in `kd_core/models/teacher.py`.
"""

from __future__ import annotations

from kd_core.config import ComputeConfig, DistillConfig, TeacherConfig
from kd_core.manifest import Manifest
from kd_core.models.teacher import (
    TeacherError, check_model_context, check_vocabulary, read_teacher_json, teacher_files, weights_identity,
)
from kd_core.stage import StageRun
from kd_core.storage import Store, absolute_url, reaching, url_to_fs
from kd_core.tasks import task_of
from kd_core.redaction import redact
from kd_core.train.spec import StudentStart, TrainSpec
from kd_core.train.ray_glue import fit_stage


def teacher(
    config: TeacherConfig,
    prep: Manifest,
    store: Store,
    compute: ComputeConfig,
    *,
    checkpointing: DistillConfig = DistillConfig(),
    force: bool = False,
) -> Manifest:
    """`checkpointing` gives the checkpoint settings of a teacher kdflow trains (`checkpoint_every`,
    `keep_checkpoints`, `resume`: the job's `distill` section; none of them is part of the key)."""
    task = task_of(prep)
    own = task.teacher_step(config, prep, store, compute, force)
    if own is not None:  # the task's own kind of teacher (tabular: a scikit-learn pipeline)
        return own
    if config.path and not config.finetune:
        return _use_existing(config.path, prep, store, force)
    if config.path:
        return _finetune_existing(config, prep, store, compute, checkpointing, force)
    section = task.teacher_settings(config)
    run = StageRun(store, "teacher", section, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    spec = TrainSpec.from_prep(
        prep, store, run.folder, config.architecture, config.train, task=task, role="teacher",
        checkpoint_every=checkpointing.checkpoint_every, keep_checkpoints=checkpointing.keep_checkpoints,
    )
    return fit_stage(run, spec, compute, "teacher: train", fresh=force or checkpointing.resume == "never")


def _use_existing(url: str, prep: Manifest, store: Store, force: bool) -> Manifest:
    identity = _identity(url, store)
    run = StageRun(store, "teacher", identity, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    _check_existing(url, prep, store)
    return run.finish(details={"external_url": absolute_url(url)})  # read by workers in other folders


def _finetune_existing(config: TeacherConfig, prep: Manifest, store: Store, compute: ComputeConfig, checkpointing: DistillConfig, force: bool) -> Manifest:
    """`teacher.finetune`: the model at `teacher.path`, checked as one used as it is, trained on
    the training split with `teacher.train` from its own weights; stored like a trained teacher."""
    identity = _identity(config.path, store)
    run = StageRun(store, "teacher", identity | {"finetune": config.train.model_dump(mode="json")}, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    _check_existing(config.path, prep, store)
    start = StudentStart("pretrained", path=absolute_url(config.path), weights_identity=identity["weights_identity"], field="teacher.path")
    spec = TrainSpec.from_prep(
        prep, store, run.folder, config.architecture, config.train, task=task_of(prep), role="teacher",
        checkpoint_every=checkpointing.checkpoint_every, keep_checkpoints=checkpointing.keep_checkpoints, student_start=start,
    )
    return fit_stage(run, spec, compute, "teacher: fine-tune", fresh=force or checkpointing.resume == "never", details={"finetuned_from": redact(config.path)})


def _identity(url: str, store: Store) -> dict:
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, "teacher.path"):
        files = teacher_files(fs, root, url)
        return {"path": url, "weights_identity": weights_identity(fs, root, files)}


def _check_existing(url: str, prep: Manifest, store: Store) -> None:
    """The teacher folder reads the prepared data: its vocabulary, and a context of data.seq_len."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, "teacher.path"):
        files = teacher_files(fs, root, url)
        model_config = fs.cat_file(f"{root}/config.json")
        tokenizer = fs.cat_file(f"{root}/tokenizer.json") if f"{root}/tokenizer.json" in files else None
    if tokenizer is None:
        raise TeacherError(f"teacher.path: {url} has no tokenizer.json; the teacher must share the data's tokenizer")
    check_vocabulary(
        tokenizer, url, store, prep, field="teacher.path", error=TeacherError,
        advice=f"prepare the data with the teacher's tokenizer (data.tokenizer: {url}, or leave data.tokenizer unset)",
    )
    check_model_context(read_teacher_json(model_config, f"{url}/config.json"), url, prep.details["seq_len"])
