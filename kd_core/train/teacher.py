"""The teacher step of the cache stage: an existing model, or one kdflow trains and keeps.

- `teacher.path` set: the directory is used where it is. The stage records its identity (the
  object store's ETags of its weight files, or their sha256) so a changed teacher gives a new
  cache key, and checks that its
  tokenizer has the prepared data's vocabulary.
- `teacher.path` unset: kdflow trains the teacher from `teacher.architecture` with cross-entropy
  on the training split (seeded, through the same loop and Ray Train workers as students). The
  result is stored under its key and reused by every later run with the same data and config.
  It checkpoints like a student (`distill.checkpoint_every`, `keep_checkpoints`, `resume`), so
  a teacher run that stops midway continues from its latest checkpoint.
  For `task: reward` the teacher is a text reward model (sequence classification, one output)
  trained with Bradley–Terry on the human labels of the training pairs' text view (the image's
  text rendering, the prompt and each response); an existing one (`teacher.path`) is any Hugging
  Face sequence-classification reward model that uses the data's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kd_core.config import ComputeConfig, DistillConfig, TeacherConfig
from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.models import CACHE_ROOT, local_copy
from kd_core.stage import StageRun
from kd_core.storage import Store, storage_options
from kd_core.train.loop import TrainSpec
from kd_core.train.ray_glue import fit_stage


class TeacherError(InputError):
    """A teacher directory that cannot teach this data."""


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
    if config.path:
        return _use_existing(config.path, prep, store, force)
    section = config.model_dump(mode="json", exclude={"path"})
    run = StageRun(store, "teacher", section, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    spec = TrainSpec.from_prep(
        prep, store, run.folder, config.architecture, config.train, teacher=True,
        checkpoint_every=checkpointing.checkpoint_every, keep_checkpoints=checkpointing.keep_checkpoints,
    )
    return fit_stage(run, spec, compute, "teacher: train", fresh=force or checkpointing.resume == "never")


def _use_existing(url: str, prep: Manifest, store: Store, force: bool) -> Manifest:
    fs, root = fsspec.core.url_to_fs(url, **storage_options(store.config))
    weight_files = sorted(path for path in fs.find(root) if path.endswith(".safetensors"))
    if not weight_files:
        raise TeacherError(f"teacher.path: {url} holds no .safetensors weights; kdflow loads only safetensors")
    digest = hashlib.sha256()
    for path in weight_files:
        digest.update(_file_identity(fs, path).encode())
    identity = {"path": url, "weights_identity": digest.hexdigest()}
    run = StageRun(store, "teacher", identity, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    _check_vocabulary(fs, root, url, store, prep)
    return run.finish(details={"external_url": url})


def _file_identity(fs, path: str) -> str:
    """The object store's ETag when it has one (no download of a large teacher), else the sha256."""
    etag = fs.info(path).get("ETag")
    if etag:
        return f"etag:{etag}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_vocabulary(fs, root: str, url: str, store: Store, prep: Manifest) -> None:
    teacher_tokenizer = f"{root}/tokenizer.json"
    if not fs.exists(teacher_tokenizer):
        raise TeacherError(f"teacher.path: {url} has no tokenizer.json; the teacher must share the data's tokenizer")
    prepared = json.loads(store.read_bytes(f"{prep.folder}/tokenizer/tokenizer.json"))["model"]["vocab"]
    theirs = json.loads(fs.cat_file(teacher_tokenizer))["model"]["vocab"]
    if prepared != theirs:
        raise TeacherError(
            f"teacher.path: {url} uses a different vocabulary ({len(theirs)} entries) from the prepared data "
            f"({len(prepared)}); prepare the data with the teacher's tokenizer"
        )


def teacher_model_config(store: Store, teacher_manifest: Manifest) -> dict:
    """The teacher's Hugging Face `config.json` (vocabulary size, hidden size, layers), read alone."""
    external = teacher_manifest.details.get("external_url")
    if external is None:
        return json.loads(store.read_bytes(f"{teacher_manifest.details['model_folder']}/config.json"))
    fs, root = fsspec.core.url_to_fs(external, **storage_options(store.config))
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/config.json"))


def teacher_model_dir(store: Store, teacher_manifest: Manifest) -> Path:
    """A local folder holding the teacher's Hugging Face directory."""
    external = teacher_manifest.details.get("external_url")
    if external is None:
        return local_copy(store, teacher_manifest.details["model_folder"])
    fs, root = fsspec.core.url_to_fs(external, **storage_options(store.config))
    if isinstance(fs, LocalFileSystem):
        return Path(root)
    target = CACHE_ROOT / "teachers" / teacher_manifest.key
    if not target.exists():
        fs.get(root.rstrip("/") + "/", str(target), recursive=True)
    return target
