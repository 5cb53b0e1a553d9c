"""Hugging Face models and tokenizers as users bring them, built from config here and saved in
their real format (safetensors, tokenizer.json, tokenizer_config.json with a chat template).

- `style_tokenizer("llama" | "gpt2" | "qwen", texts)`: byte-level BPE tokenizers shaped like the
  families': Llama (<s>, </s>, <unk>; a bos template; no <|endoftext|>, no chat template of its
  own), GPT-2 (<|endoftext|> as bos, eos and unk), Qwen (<|endoftext|> as eos and pad,
  <|im_start|> / <|im_end|>, the ChatML template).
- `save_model(folder, family, tokenizer, ...)`: a tiny Llama, Qwen2 or GPT-2 causal LM with
  seeded random weights, its output layer optionally padded past the tokenizer (as Qwen's is).
- `CHATML` and `LLAMA2_CHAT`: chat templates, the second to give in config for a tokenizer
  that lacks one.

Imported by the test files (pytest puts tests/ on the path) and by benchmarks.
"""

from __future__ import annotations

import random

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen's ChatML: every turn between <|im_start|>role and <|im_end|>."""

LLAMA2_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""A Llama-2-style template: [INST] user [/INST] answer </s>; no generation prompt of its own."""

WORDS = "the a model teacher student token data learns predicts returns list value function string number zip map".split()


def paragraphs(count: int, seed: int, words: int = 30) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(words)) + f" {seed}-{index}." for index in range(count)]


def style_tokenizer(style: str, texts: list[str], vocab_size: int = 400):
    """A tokenizer of one family's shape (module docstring), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama": ["<unk>", "<s>", "</s>"], "gpt2": ["<|endoftext|>"], "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[style]
    tokenizer = Tokenizer(models.BPE(unk_token=specials[0] if style != "qwen" else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if style == "llama":
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if style == "qwen":
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML,
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def save_model(
    folder, family: str, tokenizer, *, hidden_size: int = 32, layers: int = 2, heads: int = 2, padded: int = 0, context: int = 128,
    seed: int = 0,
):
    """A tiny causal LM of `family` (`llama`, `qwen2`, `gpt2`) with seeded random weights and
    `tokenizer`, saved with transformers into `folder`; `padded` extra output rows past the
    tokenizer's vocabulary. Returns the folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    vocab = len(tokenizer) + padded
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=context, **ids))
    else:
        shape = dict(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context, **ids,
        )
        model = LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **shape))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
