"""Students that do not start from random weights (`student.init`, `task: causal_lm`).

- `pretrained`: a Hugging Face causal-LM folder on any fsspec store (`student.path`), of any
  architecture `AutoModelForCausalLM` loads. `check_pretrained_student` reads only its listing,
  `config.json` and tokenizer: safetensors weights (pickled ones are refused, never loaded), the
  prepared data's vocabulary, an output layer at least that wide (a padded one is fine: the
  training step cuts the student's logits to the data's vocabulary) and a context of at least
  `data.seq_len`. `pretrained_model_dir` gives a local copy, downloaded once per node like the
  teacher's, and still the folder whose identity the step recorded.
- `from_teacher`: `cut_from_teacher` keeps some of the teacher's blocks (any layout with a list of
  blocks: Llama-family `model.layers`, GPT-2 `transformer.h`) and, for the Llama layout, the most
  important residual and MLP channels (the importance `kd_core.config.FromTeacherConfig`
  documents). The result is a model of the teacher's own class, with a config that says so
  (`num_hidden_layers`, `hidden_size`, `intermediate_size`, an explicit `head_dim`), so it saves
  and loads with `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from kd_core.config import WIDTH_PRUNABLE, FromTeacherConfig
from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.models import CACHE_ROOT, quiet_transformers
from kd_core.models.teacher import (
    check_model_context, check_vocabulary, model_folder_files, read_teacher_json, recorded_folder, weights_identity,
)
from kd_core.storage import Store, reaching, url_to_fs

FIELD = "student.path"

LAYER_LISTS = ("model.layers", "transformer.h", "encoder.layer", "transformer.layer")
"""Where a model keeps its list of blocks: Llama, Qwen2, Mistral (`model.layers`); GPT-2
(`transformer.h`); encoders: BERT (`encoder.layer`), DistilBERT (`transformer.layer`)."""


class StudentError(InputError):
    """A student's starting point that cannot be used with this data or teacher."""


# ------------------------------------------------------------------------------------- pretrained
def pretrained_identity(url: str, store: Store) -> tuple[dict[str, dict], str]:
    """(the listing, the `weights_identity`) of the pretrained student's folder."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    with reaching(url, FIELD):
        files = model_folder_files(fs, root, url, FIELD, StudentError)
        return files, weights_identity(fs, root, files)


def check_pretrained_student(url: str, store: Store, prep: Manifest, *, data_ids: bool = True) -> str:
    """Check the folder at `url` against the prepared data, from its listing, config.json and
    tokenizer alone; returns its `weights_identity`. A student that tokenizes the text itself
    (`data_ids` false: the task's `Task.pretrained_reads_data_ids`) needs only its own tokenizer."""
    fs, root = url_to_fs(url, store.config)
    root = root.rstrip("/")
    files, identity = pretrained_identity(url, store)
    with reaching(url, FIELD):
        model_config = read_teacher_json(fs.cat_file(f"{root}/config.json"), f"{url}/config.json", FIELD, StudentError)
        tokenizer = fs.cat_file(f"{root}/tokenizer.json") if f"{root}/tokenizer.json" in files else None
    if tokenizer is None:
        what = "a student must read the data's tokenizer" if data_ids else "the student reads the texts with its own tokenizer"
        raise StudentError(f"{FIELD}: {url} has no tokenizer.json; {what}: save it beside the model")
    if not data_ids:
        return identity
    check_vocabulary(
        tokenizer, url, store, prep, field=FIELD, error=StudentError,
        advice="a student must read the data's token ids: start from a model saved with the tokenizer the data was prepared with "
        "(data.tokenizer, or teacher.path's)",
    )
    data_vocab, seq_len = prep.details["vocab_size"], prep.details["seq_len"]
    outputs = model_config.get("vocab_size")
    if outputs is not None and outputs < data_vocab:
        raise StudentError(
            f"{FIELD}: {url}/config.json: its output layer predicts {outputs} tokens (vocab_size) but the data's tokenizer has "
            f"{data_vocab}; resize its token embeddings (model.resize_token_embeddings({data_vocab})) and save it again"
        )
    check_model_context(model_config, url, seq_len, "the student (student.path)", StudentError)
    return identity


def pretrained_model_dir(url: str, identity: str, store: Store, field: str = FIELD) -> Path:
    """A local folder holding the pretrained model (a student's `student.path`, or a teacher
    fine-tuned from `teacher.path`; `field` names it): the folder itself on local disk, else a
    copy downloaded once per node (`storage.download_folder`). It must still be the folder the
    step recorded (`identity`)."""
    return recorded_folder(
        url, identity, store, field, StudentError, CACHE_ROOT / "students" / identity, "this step",
        "the keys of the steps that train from it cover those files, so they are redone",
    )


def load_pretrained_student(folder: Path, dropout: float = 0.0):
    """The causal LM in `folder` (safetensors only, float32, in train mode). `dropout` becomes its
    attention dropout where its config has one by that name (the Llama family; a GPT-2 keeps its
    own `attn_pdrop`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = dropout
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, use_safetensors=True)
    return model.train()


def starting_model(record: dict, store: Store, teacher: Manifest):
    """The model a student started from, as its manifest records it (`details["student_start"]`):
    the pretrained folder, or the same cut of the teacher step's model (`teacher`), in eval mode;
    None for a student built from config."""
    if record.get("init") == "pretrained":
        return load_pretrained_student(pretrained_model_dir(record["path"], record["weights_identity"], store)).eval()
    if record.get("init") == "from_teacher":
        from kd_core.models import load_causal_lm
        from kd_core.models.teacher import teacher_model_dir

        teacher_model = load_causal_lm(teacher_model_dir(store, teacher))
        return cut_from_teacher(teacher_model, record["layers"], record["hidden_size"], record["intermediate_size"]).eval()
    return None


# ----------------------------------------------------------------------------------- from_teacher
def cut_settings(cut: FromTeacherConfig, teacher_config: dict) -> tuple[list[int], int | None, int | None]:
    """(kept blocks, hidden size, intermediate size) of the student `cut` makes of the teacher whose
    config.json is `teacher_config`; `StudentError` naming the field when they do not fit it."""
    layers = teacher_config.get("num_hidden_layers", teacher_config.get("n_layer", teacher_config.get("n_layers")))
    hidden = teacher_config.get("hidden_size", teacher_config.get("n_embd"))
    try:
        cut.check_width(hidden, teacher_config.get("intermediate_size"), teacher_config.get("model_type", "unknown"))
        return cut.kept_layers(layers), cut.hidden_size, cut.intermediate_size
    except ValueError as err:
        raise StudentError(str(err)) from None


def cut_from_teacher(teacher, layers: list[int], hidden_size: int | None = None, intermediate_size: int | None = None):
    """A new model of the teacher's class holding its blocks `layers` (in that order) and, with
    `hidden_size` / `intermediate_size`, only that many of its most important residual / MLP
    channels (Llama layout only). Every kept weight is the teacher's (sliced)."""
    state = {name: tensor.detach().clone() for name, tensor in teacher.state_dict().items()}
    prefix = _layer_list(state)
    state = _keep_layers(state, prefix, layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block settings (e.g. sliding windows) follow their block
        config.layer_types = [config.layer_types[index] for index in layers]
    if hidden_size is not None or intermediate_size is not None:
        if config.model_type not in WIDTH_PRUNABLE:
            field = "hidden_size" if hidden_size is not None else "intermediate_size"
            raise StudentError(
                f"student.from_teacher.{field}: width pruning works on the Llama layout ({', '.join(WIDTH_PRUNABLE)}), the "
                f"teacher is {config.model_type!r}; leave it null"
            )
        state = _prune_width(state, config, len(layers), hidden_size, intermediate_size)
    no_pooler = {"add_pooling_layer": False} if getattr(teacher, "pooler", "none") is None else {}  # an encoder loaded without BERT's pooler
    student = type(teacher)(config, **no_pooler)
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).dtype)


def _layer_list(state: dict[str, torch.Tensor]) -> str:
    for prefix in LAYER_LISTS:
        if any(name.startswith(f"{prefix}.") for name in state):
            return prefix
    raise StudentError(
        f"student.init: from_teacher keeps blocks of a model that holds them in one of {', '.join(LAYER_LISTS)}; this teacher "
        "has none of them: use student.init config or pretrained"
    )


def _keep_layers(state: dict[str, torch.Tensor], prefix: str, layers: list[int]) -> dict[str, torch.Tensor]:
    """The state with only blocks `layers` of `prefix`, renumbered 0, 1, ..."""
    block = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(layers)}
    kept = {}
    for name, tensor in state.items():
        match = block.match(name)
        if match is None:
            kept[name] = tensor
        elif int(match[1]) in new_index:
            kept[f"{prefix}.{new_index[int(match[1])]}.{match[2]}"] = tensor
    return kept


# The Llama layout: what each weight reads (columns) or writes (rows) of the residual stream.
_READS_RESIDUAL = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")
_WRITES_RESIDUAL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
_RESIDUAL_VECTORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.bias", "mlp.down_proj.bias")
_HEAD_SIDE = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
"""Biases over the heads' channels: untouched by width pruning (heads stay whole)."""


def residual_importance(state: dict[str, torch.Tensor], blocks: int, tied: bool) -> torch.Tensor:
    """(H,) the L2 norm of every weight that reads or writes each residual channel: the input
    embedding's and an untied output layer's columns, and in every block q/k/v/gate/up_proj's
    columns and o/down_proj's rows."""
    squares = state["model.embed_tokens.weight"].float().pow(2).sum(0)
    if "lm_head.weight" in state and not tied:
        squares = squares + state["lm_head.weight"].float().pow(2).sum(0)
    for index in range(blocks):
        for name in _READS_RESIDUAL:
            squares = squares + state[f"model.layers.{index}.{name}"].float().pow(2).sum(0)
        for name in _WRITES_RESIDUAL:
            squares = squares + state[f"model.layers.{index}.{name}"].float().pow(2).sum(1)
    return squares.sqrt()


def mlp_importance(state: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """(I,) block `index`'s MLP channels: the L2 norm of each one's gate_proj and up_proj rows and down_proj column."""
    block = f"model.layers.{index}.mlp"
    squares = state[f"{block}.gate_proj.weight"].float().pow(2).sum(1) + state[f"{block}.up_proj.weight"].float().pow(2).sum(1)
    return (squares + state[f"{block}.down_proj.weight"].float().pow(2).sum(0)).sqrt()


def _most_important(importance: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the `count` largest entries, in increasing order (ties: the lower index)."""
    order = torch.sort(importance, descending=True, stable=True).indices[:count]
    return order.sort().values


def _prune_width(state, config, blocks: int, hidden_size: int | None, intermediate_size: int | None) -> dict[str, torch.Tensor]:
    """Slice every weight of a Llama-layout state to the kept channels; updates `config`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim  # heads stay whole: num_heads × head_dim no longer equals hidden_size
    known = (*_READS_RESIDUAL, *_WRITES_RESIDUAL, *_RESIDUAL_VECTORS, *_HEAD_SIDE, "mlp.gate_proj.bias", "mlp.up_proj.bias")
    for name in state:
        match = re.match(r"^model\.layers\.\d+\.(.*)$", name)
        if match and match[1] not in known:
            raise StudentError(
                f"student.from_teacher: the teacher's block weight {name} is not part of the Llama layout kdflow prunes in width; "
                "leave student.from_teacher.hidden_size and intermediate_size null"
            )
    # Both importances come from the teacher's full weights, before anything is sliced.
    residual_keep = _most_important(residual_importance(state, blocks, config.tie_word_embeddings), hidden_size) if hidden_size else None
    mlp_keeps = [_most_important(mlp_importance(state, index), intermediate_size) for index in range(blocks)] if intermediate_size else []
    state = dict(state)
    for index, keep in enumerate(mlp_keeps):
        block = f"model.layers.{index}.mlp"
        for name in ("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias"):
            if f"{block}.{name}" in state:
                state[f"{block}.{name}"] = state[f"{block}.{name}"][keep].contiguous()
        state[f"{block}.down_proj.weight"] = state[f"{block}.down_proj.weight"][:, keep].contiguous()
    if intermediate_size:
        config.intermediate_size = intermediate_size
    if residual_keep is not None:
        for name, tensor in list(state.items()):
            suffix = re.sub(r"^model\.layers\.\d+\.", "", name)
            if name in ("model.embed_tokens.weight", "lm_head.weight") or suffix in _READS_RESIDUAL:
                state[name] = tensor[:, residual_keep].contiguous()
            elif suffix in _WRITES_RESIDUAL:
                state[name] = tensor[residual_keep].contiguous()
            elif name == "model.norm.weight" or suffix in _RESIDUAL_VECTORS:
                state[name] = tensor[residual_keep].contiguous()
        config.hidden_size = hidden_size
    return state
