"""Where a job's teacher is, and what it is: the helpers every stage that reads the teacher uses.

The teacher step records either an external Hugging Face directory (`teacher.path`, by the
identity of its files) or a model kdflow trained (a manifest with its files' sha256s). From that
record, `teacher_model_config` reads its `config.json` alone and `teacher_model_dir` gives a local
copy of the whole folder (downloaded once per node, under a lock, checked against the record).
`check_model_folder` is what the teacher step checks before a run (`kdflow validate
--check-inputs` runs it too).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.models import CACHE_ROOT, model_copy
from kd_core.storage import Store, content_identity, download_folder, reaching, url_to_fs


class TeacherError(InputError):
    """A teacher directory that cannot teach this data."""


IDENTITY_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
"""Besides the weights, what makes a teacher directory the teacher it is (a sentence encoder's
modules too: its pooling, projection and normalisation, `SENTENCE_MODULE_CONFIG`)."""
SENTENCE_MODULE_CONFIG = re.compile(r"/\d+_[A-Za-z]+/config\.json$")
"""A sentence-transformers module's config (`1_Pooling/config.json`, `2_Dense/config.json`)."""


def weights_identity(fs, root: str, files: dict[str, dict]) -> str:
    """sha256 over the identities (ETag, or sha256) of a teacher folder's weights, IDENTITY_FILES
    and sentence-transformers module configs (each only where the folder has it)."""
    modules = sorted(path for path in files if SENTENCE_MODULE_CONFIG.search(path[len(root):]))
    named = [*sorted(path for path in files if path.endswith(".safetensors")), *(f"{root}/{name}" for name in IDENTITY_FILES), *modules]
    identities = [f"{path[len(root):]}={content_identity(fs, path, files[path])}" for path in named if path in files]
    return hashlib.sha256("\n".join(identities).encode()).hexdigest()


def check_model_folder(
    url: str, store: Store, seq_len: int, field: str = "teacher.path", error: type[InputError] = TeacherError, who: str = "the teacher",
) -> None:
    """What can be checked of a model folder (`field`: the teacher's, or a pretrained student's)
    before a run, from its listing and config.json alone (`kdflow validate --check-inputs`):
    safetensors weights, a config.json and a context of at least `seq_len` tokens."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, field):
        model_folder_files(fs, root, url, field, error)
        model_config = fs.cat_file(f"{root}/config.json")
    check_model_context(read_teacher_json(model_config, f"{url}/config.json", field, error), url, seq_len, who, error)


def teacher_files(fs, root: str, url: str) -> dict[str, dict]:
    """path -> info of every file in a teacher folder that has safetensors weights and a config.json."""
    return model_folder_files(fs, root, url, "teacher.path", TeacherError)


def model_folder_files(fs, root: str, url: str, field: str, error: type[InputError]) -> dict[str, dict]:
    """path -> info of every file in a Hugging Face model folder (`field` names it in errors, raised
    as `error`), which must hold safetensors weights and a config.json. Pickled weights
    (pytorch_model.bin) are never loaded: a folder with only those is an error."""
    if not fs.isdir(root):
        raise error(f"{field}: {url} is not a folder; point it at a Hugging Face model directory")
    files = fs.find(root, detail=True)
    if not any(path.endswith(".safetensors") for path in files):
        pickled = sorted(path[len(root) + 1:] for path in files if path.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f" (it has {', '.join(pickled[:3])}: pickled weights, which kdflow never loads)" if pickled else ""
        raise error(
            f"{field}: {url} holds no .safetensors weights{found}; kdflow loads only safetensors: save the model with "
            "save_pretrained(folder, safe_serialization=True)"
        )
    if f"{root}/config.json" not in files:
        raise error(f"{field}: {url} has no config.json; point it at a Hugging Face model directory")
    return files


def read_teacher_json(data: bytes, where: str, field: str = "teacher.path", error: type[InputError] = TeacherError) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{field}: {where} is not valid JSON ({err}); save the model again with save_pretrained") from None


def model_context(model_config: dict) -> int | None:
    """The longest input a model's config.json allows (max_position_embeddings; GPT-2: n_positions)."""
    return model_config.get("max_position_embeddings") or model_config.get("n_positions")


def check_model_context(model_config: dict, url: str, seq_len: int, who: str = "the teacher", error: type[InputError] = TeacherError) -> None:
    """The model (`who`, at `url`) reads rows of `seq_len` tokens: its config's context is at least that."""
    context = model_context(model_config)
    if context is not None and context < seq_len:
        raise error(
            f"data.seq_len: {seq_len} tokens per row, but {who} at {url} reads at most {context} "
            f"(max_position_embeddings / n_positions); set data.seq_len <= {context}"
        )


def check_vocabulary(tokenizer_json: bytes, url: str, store: Store, prep: Manifest, *, field: str, advice: str, error: type[InputError]) -> None:
    """A model folder's tokenizer (its tokenizer.json, at `url`) must be the prepared data's, every
    token and id (added ones too); else `error` naming `field`, ending with `advice`."""
    from tokenizers import Tokenizer

    prepared = Tokenizer.from_str(store.read_bytes(f"{prep.folder}/tokenizer/tokenizer.json").decode()).get_vocab(with_added_tokens=True)
    try:
        theirs = Tokenizer.from_str(tokenizer_json.decode()).get_vocab(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise error(f"{field}: {url}/tokenizer.json cannot be read ({err}); save the tokenizer again") from None
    if prepared != theirs:
        differ = sorted(set(prepared.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise error(
            f"{field}: {url} uses a different vocabulary ({len(theirs)} entries) from the prepared data "
            f"({len(prepared)}; e.g. {', '.join(f'{token!r}={index}' for token, index in differ)}); {advice}"
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
    return recorded_folder(
        external, teacher_manifest.config.get("weights_identity"), store, "teacher.path", TeacherError,
        CACHE_ROOT / "teachers" / teacher_manifest.key, f"the teacher step {teacher_manifest.key}",
        "the teacher step's key covers those files, so it and the cache are redone",
    )


def recorded_folder(
    url: str, identity: str, store: Store, field: str, error: type[InputError], target: Path, recorder: str, redone: str,
) -> Path:
    """A local folder holding the model folder at `url` (named `field` in errors, raised as
    `error`), which must still be the folder `recorder` recorded (`weights_identity`): the folder
    itself on local disk, else a copy downloaded once per node into `target`
    (`storage.download_folder`), its files checked against the sizes of the listing. `redone`
    says which steps a rerun redoes."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, field):
        files = model_folder_files(fs, root, url, field, error)
        if weights_identity(fs, root, files) != identity:
            raise error(
                f"{field}: {url} changed after {recorder} recorded it (its weights, config or tokenizer files differ); rerun the "
                f"job: {redone}"
            )
        if isinstance(fs, LocalFileSystem):
            return Path(root)
        return download_folder(fs, root, target, source=url, listing=files)
