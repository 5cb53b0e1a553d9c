"""Building, saving and loading the Hugging Face causal LMs that kdflow teaches and trains.

Models are Llama-style `transformers` causal LMs built from an `ArchitectureConfig` (random
weights, seeded) or loaded from a Hugging Face directory on any fsspec store. Weights are saved as
safetensors with the tokenizer beside them, so every model directory kdflow writes loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. `sequence_inputs`
turns a batch of rows (text, or chat with position ids and a loss mask) into a causal LM's inputs
and the positions that count, for training, validation and eval alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kd_core.config import ArchitectureConfig
from kd_core.manifest import Manifest
from kd_core.storage import FileRecord, Store, local_cache_folder


def quiet_transformers() -> None:
    """Our own progress bars report the work; transformers' per-file bars would interleave."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


CACHE_ROOT = local_cache_folder()


DEFAULT_SPECIAL_IDS = {"bos": 0, "eos": 0, "pad": 1}
"""The special token ids of the tokenizer kdflow trains (end-of-text 0, pad 1), and of prepared
data made before the prep stage recorded them."""


def llama_config(
    arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, dropout: float = 0.0, special_ids: dict[str, int] | None = None,
    **extra,
):
    """The `transformers.LlamaConfig` of an `ArchitectureConfig`; `special_ids` are the prepared
    tokenizer's bos / eos / pad ids (the prep manifest's `special_token_ids`), which generation
    uses; `extra` overrides, e.g. num_labels."""
    ids = special_ids or DEFAULT_SPECIAL_IDS
    from transformers import LlamaConfig

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_heads,
        "intermediate_size": arch.intermediate_size or 4 * arch.hidden_size,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": arch.tie_embeddings,
        "attention_dropout": dropout,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    return LlamaConfig(**(settings | extra))


def build_causal_lm(
    arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, seed: int, dropout: float = 0.0, special_ids: dict[str, int] | None = None
):
    from transformers import LlamaForCausalLM

    quiet_transformers()
    config = llama_config(arch, vocab_size, max_positions, dropout=dropout, special_ids=special_ids)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sequence_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the model's inputs, the positions that count) of a batch. Text rows: `input_ids` alone,
    every position counts (None). Chat rows: also `position_ids`, which restart with every
    conversation of a packed row and so keep attention within it (kd_core/data/chat.py), and
    `counted_positions` of the `loss_mask`. No KV cache: with one, Hugging Face models do not
    look for sequences packed into a row (`transformers.masking_utils`)."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].long()
    return inputs, (counted_positions(batch["loss_mask"]) if "loss_mask" in batch else None)


def counted_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t counts when token t + 1 is trained on (`loss_mask`, one per token);
    a row's last position predicts nothing in the row."""
    counted = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    counted[:, :-1] = loss_mask[:, 1:].bool()
    return counted


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token lists padded on the left to the longest, as
    `generate` continues them: every prompt ends at the last column."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(prompt)) + prompt for prompt in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts], device=device)
    return input_ids, attention


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model_dir(model, tokenizer_dir: Path, folder: Path) -> Path:
    """Write model (safetensors) and tokenizer into one Hugging Face directory on local disk. A
    tokenizer with more ids than the model's embedding (a pad token added past the vocabulary)
    would crash the saved model on its first batch: refused here, before anything is written."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = getattr(model.config, "vocab_size", None) or model.config.to_dict().get("text_config", {}).get("vocab_size")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def local_copy(store: Store, relative: str, expected: dict[str, FileRecord] | None = None) -> Path:
    """A local folder holding `relative` (the store's own path when it is on local disk); a
    download is checked against `expected`, the manifest's records of the folder's files
    (`Manifest.files_under`), and shared safely by the processes of a node (`Store.download_dir`)."""
    target = CACHE_ROOT / "downloads" / store.protocol / relative.replace("/", "__")
    return store.download_dir(relative, target, expected)


def model_copy(store: Store, manifest: Manifest) -> Path:
    """A local folder holding the model a training step wrote (`details["model_folder"]`),
    checked against that step's manifest."""
    folder = manifest.details["model_folder"]
    return local_copy(store, folder, manifest.files_under(folder))


def load_causal_lm(model_dir: Path, dtype: torch.dtype | str = torch.float32):
    """Load a Hugging Face causal LM from local disk (safetensors only, never pickle); `dtype`
    `"auto"` keeps the checkpoint's own (config.json's `dtype`, else its weights')."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    model.eval()
    return model


def temporary_dir(prefix: str) -> tempfile.TemporaryDirectory:
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=CACHE_ROOT)
