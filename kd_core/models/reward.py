"""Reward models: a text reward model (the teacher) and a multimodal one (the student).

- Text: any Hugging Face sequence-classification model with one output (`num_labels=1`) scores a
  token sequence; kdflow builds a Llama-style one from config (`LlamaForSequenceClassification`,
  pooled at the last non-padding token) when it trains the teacher itself, and loads any other
  with `AutoModelForSequenceClassification` from a directory (safetensors only).
- Multimodal: `MultimodalRewardModel`: a ViT image encoder, a two-layer projector to the
  language model's width, a Llama text model and a linear head, in one of two shapes
  (`student.vision.fusion`):

      late (dual encoder):  pixels ──ViT──► [CLS] ──projector──► v (B, d)
                            input_ids ──Llama──► mean of h (B, d)        r = head([v ⊙ h, h])
      prefix (LLaVA-style): pixels ──ViT──► (B, P+1, d_v) ──projector──► image tokens ─┐
                            input_ids ──embed──► (B, T, d) ───────────────────────────┴─► Llama ─► h[last] ─► head ─► r

  `late` scores a bilinear form of the image and text vectors and reads the text once, without
  image tokens; `prefix` lets every text token attend to every patch, as vision-language models
  do (`benchmarks/reward_study.py` compares them over seeds; docs/benchmarks.md).
  It is a `transformers.PreTrainedModel` with its own config class (`model_type`
  `kdflow_multimodal_reward`), so `save_pretrained` / `from_pretrained` write and read a normal
  Hugging Face directory (config.json + model.safetensors), and `load_reward_model` opens either
  kind. Images are uint8 RGB arrays, (B, H·W·3) or (B, H, W, 3); the model scales them to [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel

from kd_core.config import ArchitectureConfig, VisionConfig
from kd_core.models import llama_config, quiet_transformers

MULTIMODAL_MODEL_TYPE = "kdflow_multimodal_reward"


def text_reward_config(arch: ArchitectureConfig, vocab_size: int, max_positions: int, pad_id: int, dropout: float = 0.0):
    """A Llama config with one output and no output embedding to tie."""
    return llama_config(arch, vocab_size, max_positions, dropout=dropout, tie_word_embeddings=False, pad_token_id=pad_id, num_labels=1)


def build_text_reward_model(arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, pad_id: int, seed: int, dropout: float = 0.0):
    """A Llama sequence-classification reward model with one scalar output, random weights (seeded)."""
    from transformers import LlamaForSequenceClassification

    quiet_transformers()
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(text_reward_config(arch, vocab_size, max_positions, pad_id, dropout))


class MultimodalRewardConfig(PretrainedConfig):
    model_type = MULTIMODAL_MODEL_TYPE

    def __init__(
        self, vision_config: dict | None = None, text_config: dict | None = None, image_size: int = 16, fusion: str = "late", **kwargs
    ):
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or {})
        self.text_config = dict(text_config or {})
        self.image_size = image_size
        self.fusion = fusion


class MultimodalRewardModel(PreTrainedModel):
    config_class = MultimodalRewardConfig
    base_model_prefix = "reward"
    main_input_name = "input_ids"

    def __init__(self, config: MultimodalRewardConfig):
        super().__init__(config)
        text_config = LlamaConfig(**config.text_config)
        vision_config = ViTConfig(**config.vision_config)
        self.vision = ViTModel(vision_config, add_pooling_layer=False)
        self.projector = nn.Sequential(
            nn.Linear(vision_config.hidden_size, text_config.hidden_size),
            nn.GELU(),
            nn.Linear(text_config.hidden_size, text_config.hidden_size),
        )
        self.text = LlamaModel(text_config)
        width = text_config.hidden_size
        self.head = nn.Linear(2 * width if config.fusion == "late" else width, 1)
        self.pad_id = text_config.pad_token_id
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The towers keep their own initialisation; the projector and the head take torch's default
        (fan-in scaled): at std 0.02 the projector shrinks the image features' gradient so much that
        the image encoder learns several times slower."""
        if module in (*self.projector, self.head) and isinstance(module, nn.Linear):
            module.reset_parameters()

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P+1, d): the image's ViT features projected to the language model's width."""
        size = self.config.image_size
        if pixel_values.dtype == torch.uint8:
            pixels = pixel_values.reshape(len(pixel_values), size, size, 3).permute(0, 3, 1, 2)
            pixel_values = pixels.to(self.head.weight.dtype) / 127.5 - 1.0
        return self.projector(self.vision(pixel_values=pixel_values).last_hidden_state)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of responses `input_ids` (B, T, right-padded) about images `pixel_values`."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_id).long()
        image = self.image_tokens(pixel_values)
        if self.config.fusion == "late":
            hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            text = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # mean over the real tokens
            image_vector = image[:, 0]  # the ViT's [CLS] position, projected
            return self.head(torch.cat([image_vector * text, text], dim=-1)).squeeze(-1).float()
        rows = torch.arange(len(input_ids), device=input_ids.device)
        last = attention_mask.sum(-1).clamp_min(1) - 1  # right padding: the last real token
        embeddings = torch.cat([image, self.text.embed_tokens(input_ids)], dim=1)
        mask = torch.cat([torch.ones(image.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], dim=1)
        hidden = self.text(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
        return self.head(hidden[rows, image.shape[1] + last]).squeeze(-1).float()


def build_multimodal_reward_model(
    vision: VisionConfig, arch: ArchitectureConfig, vocab_size: int, max_positions: int, *, image_size: int, pad_id: int, seed: int,
    dropout: float = 0.0,
) -> MultimodalRewardModel:
    """The student: a ViT (from `vision`), a projector and a Llama decoder (from `arch`), random weights (seeded)."""
    quiet_transformers()
    vision_config = ViTConfig(
        image_size=image_size,
        patch_size=vision.patch_size,
        num_channels=3,
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        intermediate_size=4 * vision.hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    text = text_reward_config(arch, vocab_size, max_positions, pad_id, dropout)
    config = MultimodalRewardConfig(
        vision_config=vision_config.to_dict(), text_config=text.to_dict(), image_size=image_size, fusion=vision.fusion
    )
    torch.manual_seed(seed)
    return MultimodalRewardModel(config)


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Right-padded rows cut to the longest one in the batch (the rewards do not change: padding
    is masked out; the compute does)."""
    longest = int((ids != pad_id).sum(-1).max()) if ids.numel() else 0
    return ids[:, : max(longest, 1)]


def text_rewards(model, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) float32 scores of a sequence-classification reward model on right-padded ids."""
    return model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits[:, 0].float()


def load_reward_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """A reward model directory kdflow wrote (multimodal) or any HF sequence-classification one;
    safetensors only, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type == MULTIMODAL_MODEL_TYPE:
        model = MultimodalRewardModel.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        if model.config.num_labels != 1:
            raise ValueError(f"{model_dir}: a reward model needs one output (num_labels=1), this one has {model.config.num_labels}")
    return model.eval()
