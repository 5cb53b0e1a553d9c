"""Greedy answers on held-out chat data: what each model writes when asked.

For the first `eval.answer_prompts` held-out conversations, the prompt is everything before the
conversation's first assistant turn, as the template rendered it (the generation prompt
included), and the reference is that assistant turn's tokens (the positions the loss mask
trains on). Every model continues the prompt greedily for at most `eval.max_new_tokens` tokens,
stopping at a stop token: the tokenizer's eos, or a special token that ends the reference
answers (e.g. ChatML's <|im_end|>). Answer and reference are decoded without special tokens and
compared after lower-casing and joining whitespace:
- `answer_exact_match`: the share of answers equal to their reference;
- `answer_f1`: the mean word-overlap F1 between answer and reference (SQuAD's token F1).
A few prompts with every model's answer go into the report.
"""

from __future__ import annotations

from collections import Counter

import torch

from kd_core.data.chat import ConversationPrompt, conversation_prompts, stop_token_ids
from kd_core.models import left_padded

EXAMPLES = 6
"""Prompts whose answers the report shows."""


@torch.no_grad()
def greedy_answers(model, prompts: list[ConversationPrompt], stop_ids: list[int], pad_id: int, max_new_tokens: int, device, batch_size: int = 16) -> list[list[int]]:
    """Each prompt's greedy continuation, cut before its first stop token (left-padded batches)."""
    answers = []
    for begin in range(0, len(prompts), batch_size):
        input_ids, attention = left_padded([p.prompt for p in prompts[begin : begin + batch_size]], pad_id, device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )
        for continuation in output[:, input_ids.shape[1] :].tolist():
            cut = next((index for index, token in enumerate(continuation) if token in stop_ids), len(continuation))
            answers.append(continuation[:cut])
    return answers


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def word_f1(answer: str, reference: str) -> float:
    said, meant = normalized(answer).split(), normalized(reference).split()
    if not said or not meant:
        return float(said == meant)
    common = sum((Counter(said) & Counter(meant)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(said), common / len(meant)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    pairs = list(zip(answers, references))
    return {
        "answer_exact_match": sum(normalized(a) == normalized(r) for a, r in pairs) / max(len(pairs), 1),
        "answer_f1": sum(word_f1(a, r) for a, r in pairs) / max(len(pairs), 1),
    }


def measure_answers(
    models: dict, rows: dict[str, torch.Tensor], tokenizer, limit: int, max_new_tokens: int, device, advance=lambda n: None
) -> tuple[dict[str, dict], list[dict]]:
    """({model: its answer scores}, examples: the first prompts with the reference and every
    model's answer); `advance(1)` after each model."""
    prompts = conversation_prompts(rows, limit)
    if not prompts:
        return {}, []
    stop_ids = stop_token_ids(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    references = [decode(p.reference) for p in prompts]
    written = {}
    for name, model in models.items():
        written[name] = [decode(ids) for ids in greedy_answers(model, prompts, stop_ids, pad_id, max_new_tokens, device)]
        advance(1)
    scores = {name: answer_scores(answers, references) | {"answer_prompts": len(prompts)} for name, answers in written.items()}
    examples = [
        {"prompt": tokenizer.decode(p.prompt, skip_special_tokens=False), "reference": references[index], "answers": {name: answers[index] for name, answers in written.items()}}
        for index, p in enumerate(prompts[:EXAMPLES])
    ]
    return scores, examples
