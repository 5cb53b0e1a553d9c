"""Sentence encoders: a Hugging Face encoder plus pooling, an optional dense projection and
optional L2 normalisation, saved and read as sentence-transformers folders.

A folder kdflow writes (`SentenceEncoder.save_pretrained`) is what `SentenceTransformer(path)`
loads as it is:

    config.json, model.safetensors, tokenizer files   the encoder (`AutoModel`), at the top
    modules.json                                      Transformer -> Pooling [-> Dense] [-> Normalize]
    sentence_bert_config.json                         max_seq_length
    1_Pooling/config.json                             the pooling mode (legacy boolean keys: every version reads them)
    2_Dense/config.json, 2_Dense/model.safetensors    the projection (`linear.weight`, `linear.bias`), identity activation

`read_sentence_config` reads the same layout from any folder, e.g. sentence-transformers'
all-MiniLM-L6-v2: its pooling and normalisation come from its own modules.json and Pooling
config. A plain Hugging Face encoder folder (no modules.json) is mean-pooled and not normalised.
Only `mean`, `cls` and `last` pooling are supported; another mode is an error naming the file.
`encoder_inputs` and `embed_rows` run an encoder over prepared text rows (`input_ids`, `tokens`:
kd_core/data/embedding_text.py), for training, the cache, validation and eval alike; a model with
its own tokenizer (`TextTokenizer`) reads the rows' text instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.config import ArchitectureConfig
from kd_core.errors import InputError

POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
"""Our pooling names and sentence-transformers' Pooling config keys for them."""
OTHER_POOLING_KEYS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
ST_TYPES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "dense": "sentence_transformers.models.Dense",
    "normalize": "sentence_transformers.models.Normalize",
}


class EncoderError(InputError):
    """An encoder folder kdflow cannot read as a sentence encoder; names the file and what to do."""


@dataclass(frozen=True)
class SentenceSettings:
    """How token states become one embedding: pooling, then an optional projection (its weights
    live in the folder's `dense_folder`), then optional normalisation; and how the text is read:
    the tokens the encoder reads at most (`max_seq_length`), lower-casing first, a default prompt."""

    pooling: str = "mean"
    normalize: bool = False
    dense_folder: str | None = None
    max_seq_length: int | None = None
    do_lower_case: bool = False
    default_prompt: str | None = None

    def reading_problem(self, seq_len: int, where: str) -> str | None:
        """Why prep's texts (cut at `seq_len` tokens, as they are) are not what this encoder reads
        (None: they are)."""
        if self.do_lower_case:
            return f"{where}: sentence_bert_config.json sets do_lower_case; kdflow reads texts as they are: use an encoder whose tokenizer lower-cases itself"
        if self.default_prompt:
            return f"{where}: config_sentence_transformers.json names a default prompt ({self.default_prompt!r}); kdflow embeds texts without prompts"
        if self.max_seq_length is not None and seq_len > self.max_seq_length:
            return f"data.seq_len: {seq_len} tokens, but {where} reads at most {self.max_seq_length} (sentence_bert_config.json max_seq_length); set data.seq_len <= {self.max_seq_length}"
        return None


def read_sentence_config(folder: Path) -> SentenceSettings:
    """The pooling, projection and normalisation a sentence-transformers folder declares
    (modules.json and its Pooling config); a folder without modules.json: mean, none, no."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return SentenceSettings()
    modules = _json(modules_file)
    reading = _reading(folder)
    pooling, normalize, dense = "mean", False, None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = _pooling_mode(_json(folder / module["path"] / "config.json"), folder / module["path"] / "config.json")
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense":
            if dense is not None:
                raise EncoderError(f"{modules_file}: more than one Dense module; kdflow reads encoders with at most one projection")
            dense = module["path"]
        elif kind == "Transformer":
            if module.get("path", "") != "":
                raise EncoderError(f"{modules_file}: the Transformer module is in {module['path']!r}; kdflow reads encoders whose weights and config.json are at the folder's top (save it again with SentenceTransformer.save)")
        else:
            raise EncoderError(f"{modules_file}: module {module.get('type')!r} is not one kdflow runs (Transformer, Pooling, Dense, Normalize)")
    return SentenceSettings(pooling, normalize, dense, **reading)


def _reading(folder: Path) -> dict:
    """How a sentence-transformers folder reads text: max_seq_length and do_lower_case
    (sentence_bert_config.json), its default prompt (config_sentence_transformers.json)."""
    reading: dict = {}
    if (folder / "sentence_bert_config.json").exists():
        config = _json(folder / "sentence_bert_config.json")
        reading = {"max_seq_length": config.get("max_seq_length"), "do_lower_case": bool(config.get("do_lower_case", False))}
    if (folder / "config_sentence_transformers.json").exists():
        config = _json(folder / "config_sentence_transformers.json")
        name = config.get("default_prompt_name")
        if name:
            reading["default_prompt"] = (config.get("prompts") or {}).get(name, name)
    return reading


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EncoderError(f"{path}: missing; a sentence-transformers folder names it in modules.json") from None
    except json.JSONDecodeError as err:
        raise EncoderError(f"{path}: not valid JSON ({err}); save the model again") from None


def _pooling_mode(config: dict, where: Path) -> str:
    if isinstance(config.get("pooling_mode"), str):  # sentence-transformers 6 writes one key
        mode = {"lasttoken": "last"}.get(config["pooling_mode"], config["pooling_mode"])
        if mode in POOLING_KEYS:
            return mode
        raise EncoderError(f"{where}: pooling_mode {config['pooling_mode']!r}; kdflow pools by mean, cls or lasttoken")
    chosen = [name for name, key in POOLING_KEYS.items() if config.get(key)]
    others = [key for key in OTHER_POOLING_KEYS if config.get(key)]
    if others or len(chosen) != 1:
        raise EncoderError(f"{where}: pooling {', '.join(others + [POOLING_KEYS[name] for name in chosen]) or 'none'}; kdflow pools by exactly one of mean, cls or lasttoken")
    return chosen[0]


class SentenceEncoder(nn.Module):
    """`forward(input_ids, attention_mask) -> (B, D)` embeddings: the encoder's last hidden states
    pooled over the real tokens, projected by `dense` when there is one, L2-normalised when
    `normalize`. `save_pretrained` writes a sentence-transformers folder (module docstring)."""

    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = False, dense: nn.Linear | None = None, max_seq_length: int = 512):
        super().__init__()
        if pooling not in POOLING_KEYS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_KEYS)}, got {pooling!r}")
        self.transformer, self.dense = transformer, dense
        self.pooling, self.normalize, self.max_seq_length = pooling, normalize, max_seq_length

    @property
    def config(self):
        """The encoder's Hugging Face config (its vocabulary, width, layers)."""
        return self.transformer.config

    @property
    def dimension(self) -> int:
        """The width of the embeddings it gives."""
        return self.dense.out_features if self.dense is not None else self.transformer.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = pool(states, attention_mask, self.pooling)
        if self.dense is not None:  # in its own dtype (a bf16 engine's), the rest in float32
            embeddings = self.dense(embeddings.to(self.dense.weight.dtype)).float()
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.transformer.save_pretrained(folder, safe_serialization=True)
        modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TYPES["transformer"]}]
        width = self.transformer.config.hidden_size
        (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
        pooling = {"word_embedding_dimension": width} | {key: name == self.pooling for name, key in POOLING_KEYS.items()}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling | dict.fromkeys(OTHER_POOLING_KEYS, False), indent=2))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_TYPES["pooling"]})
        if self.dense is not None:
            (folder / "2_Dense").mkdir(exist_ok=True)
            dense_config = {
                "in_features": self.dense.in_features, "out_features": self.dense.out_features, "bias": self.dense.bias is not None,
                "activation_function": "torch.nn.modules.linear.Identity",
            }
            (folder / "2_Dense" / "config.json").write_text(json.dumps(dense_config, indent=2))
            save_file({f"linear.{name}": tensor.detach().contiguous() for name, tensor in self.dense.state_dict().items()}, str(folder / "2_Dense" / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": ST_TYPES["dense"]})
        if self.normalize:
            index = len(modules)
            modules.append({"idx": index, "name": str(index), "path": f"{index}_Normalize", "type": ST_TYPES["normalize"]})
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": self.max_seq_length, "do_lower_case": False}, indent=2))


def started_from(source: SentenceEncoder, layers, output_dim: int | None, seed: int, seq_len: int) -> SentenceEncoder:
    """A student that starts as `source` (another encoder folder's, or the teacher's cut to blocks
    `layers`; None: all of them): its pooling, normalisation and projection, or a new seeded
    projection to `output_dim` when that is set; it reads texts of up to `seq_len` tokens."""
    from kd_core.models.students import cut_from_teacher

    body = source.transformer if layers is None else cut_from_teacher(source.transformer, list(layers))
    dense = source.dense
    if output_dim is not None:
        torch.manual_seed(seed)
        dense = nn.Linear(source.config.hidden_size, output_dim)
    return SentenceEncoder(body, source.pooling, source.normalize, dense, max_seq_length=seq_len)


def pool(states: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H) token states -> (B, H): `mean` over the real tokens (attention_mask 1), the
    first token's state (`cls`) or the last real token's (`last`; right padding). Float32."""
    states, mask = states.float(), attention_mask.float()
    if mode == "mean":
        return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    if mode == "cls":
        return states[:, 0]
    last = (mask.sum(1).long() - 1).clamp_min(0)
    return states[torch.arange(len(states), device=states.device), last]


def encoder_width(model_config: dict) -> int:
    """An encoder's hidden width from its config.json (BERT's `hidden_size`, DistilBERT's `dim`)."""
    for name in ("hidden_size", "dim", "d_model"):
        if name in model_config:
            return int(model_config[name])
    raise ValueError(f"the encoder's config.json names no width (hidden_size, dim or d_model): {sorted(model_config)[:8]}")


def encoder_config(arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, pad_id: int, dropout: float = 0.0):
    """A BERT encoder's config from an `ArchitectureConfig` (GELU MLP 4× wide unless set)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size, max_position_embeddings=max_positions, pad_token_id=pad_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, type_vocab_size=2,
    )


def build_sentence_encoder(
    arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, pad_id: int, seed: int, dropout: float = 0.0,
    pooling: str = "mean", normalize: bool = True, output_dim: int | None = None,
) -> SentenceEncoder:
    """A BERT sentence encoder built from config with seeded random weights."""
    from transformers import BertModel

    from kd_core.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    transformer = BertModel(encoder_config(arch, vocab_size, max_positions, pad_id=pad_id, dropout=dropout), add_pooling_layer=False)
    dense = nn.Linear(arch.hidden_size, output_dim) if output_dim is not None else None
    return SentenceEncoder(transformer, pooling, normalize, dense, max_seq_length=max_positions)


def load_sentence_encoder(folder: Path, dropout: float | None = None, dtype: torch.dtype = torch.float32) -> SentenceEncoder:
    """The sentence encoder in a local folder (safetensors only): the encoder through `AutoModel`
    and the pooling, projection and normalisation its modules declare (`read_sentence_config`).
    `dropout` replaces the encoder's own dropout rates (for training); None keeps them."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from kd_core.models import quiet_transformers

    quiet_transformers()
    folder = Path(folder)
    settings = read_sentence_config(folder)
    config = AutoConfig.from_pretrained(folder)
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, dropout)
    no_pooler = {"add_pooling_layer": False} if config.model_type == "bert" else {}  # BERT's [CLS] pooler: never used here
    transformer = AutoModel.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True, **no_pooler)
    dense = None
    if settings.dense_folder is not None:
        dense_dir = folder / settings.dense_folder
        dense_config = _json(dense_dir / "config.json")
        if not str(dense_config.get("activation_function", "torch.nn.modules.linear.Identity")).endswith("Identity"):
            raise EncoderError(f"{dense_dir / 'config.json'}: activation {dense_config['activation_function']!r}; kdflow runs Dense modules without an activation")
        if not (dense_dir / "model.safetensors").exists():
            raise EncoderError(f"{dense_dir}: no model.safetensors (kdflow never reads pickled weights); save the model again with safe_serialization")
        dense = nn.Linear(dense_config["in_features"], dense_config["out_features"], bias=dense_config.get("bias", True))
        dense.load_state_dict({name.removeprefix("linear."): tensor for name, tensor in load_file(str(dense_dir / "model.safetensors")).items()})
        dense = dense.to(dtype)
    max_seq_length = _json(folder / "sentence_bert_config.json").get("max_seq_length", 512) if (folder / "sentence_bert_config.json").exists() else config.max_position_embeddings
    return SentenceEncoder(transformer, settings.pooling, settings.normalize, dense, max_seq_length=max_seq_length)


@dataclass(frozen=True)
class TextTokenizer:
    """A model's own tokenizer, for a student that does not read the prepared ids: tokenizes each
    row's text (`text_bytes`, `text_length`) as sentence-transformers would, cut to `seq_len`."""

    tokenizer: object
    """A `tokenizers.Tokenizer` with truncation at `seq_len` and no padding."""
    pad_id: int

    @classmethod
    def of_folder(cls, folder: Path, seq_len: int) -> TextTokenizer:
        from transformers import PreTrainedTokenizerFast

        wrapped = PreTrainedTokenizerFast.from_pretrained(str(folder))
        backend = wrapped.backend_tokenizer
        backend.no_padding()
        backend.enable_truncation(max_length=seq_len)
        pad = wrapped.pad_token_id if wrapped.pad_token_id is not None else 0
        return cls(backend, pad)

    def __call__(self, text_bytes, text_length, device) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [bytes(row[: int(length)]).decode("utf-8") for row, length in zip(np.asarray(text_bytes), np.asarray(text_length).reshape(-1), strict=True)]
        encodings = self.tokenizer.encode_batch(texts)
        width = max([len(encoding.ids) for encoding in encodings] + [1])
        ids = torch.full((len(texts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            mask[row, : len(encoding.ids)] = 1
        return ids.to(device), mask.to(device)


def encoder_inputs(batch: dict[str, torch.Tensor], tokenizer: TextTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a batch of texts, cut to its longest text: each row's first
    `tokens` positions are its text, the rest padding; with `tokenizer`, the rows' text in the
    model's own tokens instead."""
    if tokenizer is not None:
        return tokenizer(batch["text_bytes"].cpu(), batch["text_length"].cpu(), batch["text_bytes"].device)
    lengths = batch["tokens"].reshape(-1).long()
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    ids = batch["input_ids"][:, :width].long()
    mask = (torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids, mask


@torch.no_grad()
def embed_rows(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int, device, tokenizer: TextTokenizer | None = None) -> np.ndarray:
    """(N, D) float32 embeddings of the rows' texts (`input_ids`, `tokens`; with `tokenizer`,
    `text_bytes` and `text_length`), in eval mode."""
    names = ("text_bytes", "text_length") if tokenizer is not None else ("input_ids", "tokens")
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(rows[names[0]]), batch_size):
            batch = {name: torch.as_tensor(rows[name][start : start + batch_size], device=device) for name in names}
            ids, mask = encoder_inputs(batch, tokenizer)
            parts.append(model(ids, mask).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
