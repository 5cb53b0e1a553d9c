"""The teacher step of the cache stage: an existing model, or one kdflow trains and keeps.

- `teacher.path` set: the directory is used where it is. The stage records its identity (the
  object store's ETags, or the sha256, of its weights, `config.json` and tokenizer files; a local
  file's hash is kept by size and modification time, so weights are not hashed on every run) so
  a changed teacher gives a new cache key. It checks, reading only `config.json` and the
  tokenizer, that the teacher reads the prepared data: the same full vocabulary (added tokens
  included) and a context of at least `data.seq_len` tokens.
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

from fsspec.implementations.local import LocalFileSystem

from kd_core.config import ComputeConfig, DistillConfig, TeacherConfig
from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.models import CACHE_ROOT, model_copy
from kd_core.stage import StageRun
from kd_core.storage import Store, content_identity, download_folder, reaching, url_to_fs
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


IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""Besides the weights, what makes a teacher directory the teacher it is."""


def _use_existing(url: str, prep: Manifest, store: Store, force: bool) -> Manifest:
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, "teacher.path"):
        files = _teacher_files(fs, root, url)
        identity = {"path": url, "weights_identity": weights_identity(fs, root, files)}
    run = StageRun(store, "teacher", identity, inputs={"prep": prep}, force=force)
    if run.reused:
        return run.reused
    with reaching(url, "teacher.path"):
        model_config = fs.cat_file(f"{root}/config.json")
        tokenizer = fs.cat_file(f"{root}/tokenizer.json") if f"{root}/tokenizer.json" in files else None
    if tokenizer is None:
        raise TeacherError(f"teacher.path: {url} has no tokenizer.json; the teacher must share the data's tokenizer")
    _check_vocabulary(tokenizer, url, store, prep)
    _check_context(_read_json(model_config, f"{url}/config.json"), url, prep.details["seq_len"])
    return run.finish(details={"external_url": url})


def weights_identity(fs, root: str, files: dict[str, dict]) -> str:
    """sha256 over the identities (ETag, or sha256) of a teacher folder's weights and IDENTITY_FILES."""
    named = [*sorted(path for path in files if path.endswith(".safetensors")), *(f"{root}/{name}" for name in IDENTITY_FILES)]
    identities = [f"{path[len(root):]}={content_identity(fs, path, files[path])}" for path in named if path in files]
    return hashlib.sha256("\n".join(identities).encode()).hexdigest()


def check_teacher_folder(url: str, store: Store, seq_len: int) -> None:
    """What the teacher step checks before a run, from the folder alone (`kdflow validate
    --check-inputs`): weights, config.json and a context of at least `seq_len` tokens."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, "teacher.path"):
        _teacher_files(fs, root, url)
        model_config = fs.cat_file(f"{root}/config.json")
    _check_context(_read_json(model_config, f"{url}/config.json"), url, seq_len)


def _teacher_files(fs, root: str, url: str) -> dict[str, dict]:
    """path -> info of every file in a teacher folder that has safetensors weights and a config.json."""
    if not fs.isdir(root):
        raise TeacherError(f"teacher.path: {url} is not a folder; point it at a Hugging Face model directory")
    files = fs.find(root, detail=True)
    if not any(path.endswith(".safetensors") for path in files):
        raise TeacherError(f"teacher.path: {url} holds no .safetensors weights; kdflow loads only safetensors")
    if f"{root}/config.json" not in files:
        raise TeacherError(f"teacher.path: {url} has no config.json; point it at a Hugging Face model directory")
    return files


def _read_json(data: bytes, where: str) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherError(f"teacher.path: {where} is not valid JSON ({err}); save the model again with save_pretrained") from None


def _check_vocabulary(teacher_tokenizer: bytes, url: str, store: Store, prep: Manifest) -> None:
    """The teacher's tokenizer must be the prepared data's, every token and id (added ones too)."""
    from tokenizers import Tokenizer

    prepared = Tokenizer.from_str(store.read_bytes(f"{prep.folder}/tokenizer/tokenizer.json").decode()).get_vocab(with_added_tokens=True)
    try:
        theirs = Tokenizer.from_str(teacher_tokenizer.decode()).get_vocab(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise TeacherError(f"teacher.path: {url}/tokenizer.json cannot be read ({err}); save the tokenizer again") from None
    if prepared != theirs:
        differ = sorted(set(prepared.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise TeacherError(
            f"teacher.path: {url} uses a different vocabulary ({len(theirs)} entries) from the prepared data "
            f"({len(prepared)}; e.g. {', '.join(f'{token!r}={index}' for token, index in differ)}); prepare the data with "
            f"the teacher's tokenizer (data.tokenizer: {url}, or leave data.tokenizer unset)"
        )


def _check_context(model_config: dict, url: str, seq_len: int) -> None:
    context = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    if context is not None and context < seq_len:
        raise TeacherError(
            f"data.seq_len: {seq_len} tokens per row, but the teacher at {url} reads at most {context} "
            f"(max_position_embeddings); set data.seq_len <= {context}"
        )


def teacher_model_config(store: Store, teacher_manifest: Manifest) -> dict:
    """The teacher's Hugging Face `config.json` (vocabulary size, hidden size, layers), read alone."""
    external = teacher_manifest.details.get("external_url")
    if external is None:
        return json.loads(store.read_bytes(f"{teacher_manifest.details['model_folder']}/config.json"))
    fs, root = url_to_fs(external, store.config)
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/config.json"))


def teacher_model_dir(store: Store, teacher_manifest: Manifest) -> Path:
    """A local folder holding the teacher's Hugging Face directory. A remote one is downloaded
    once per node, under a lock, into a temporary folder renamed into place when complete
    (`storage.download_folder`): a trained teacher checked against its manifest's sha256s; an
    external one must still be the folder the teacher step recorded (`weights_identity`), and its
    files are checked against the sizes of that listing."""
    external = teacher_manifest.details.get("external_url")
    if external is None:
        return model_copy(store, teacher_manifest)
    fs, root = url_to_fs(external, store.config)
    root = root.rstrip("/")
    with reaching(external, "teacher.path"):
        files = _teacher_files(fs, root, external)
        if weights_identity(fs, root, files) != teacher_manifest.config.get("weights_identity"):
            raise TeacherError(
                f"teacher.path: {external} changed after the teacher step {teacher_manifest.key} recorded it (its weights, "
                "config or tokenizer files differ); rerun the job: the teacher step's key covers those files, "
                "so it and the cache are redone"
            )
        if isinstance(fs, LocalFileSystem):
            return Path(root)
        return download_folder(fs, root, CACHE_ROOT / "teachers" / teacher_manifest.key, source=external, listing=files)
