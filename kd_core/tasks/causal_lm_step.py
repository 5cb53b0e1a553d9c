"""The torch side of the causal_lm task (kd_core/tasks/causal_lm.py imports it when it trains,
caches or validates, so that loading a job does not wait for torch).

- `CausalLMStep`: the trained module of a language model: the model and its
  `DistillationObjective`; `forward(batch, targets)` returns the loss terms.
- `CachedLMTargets`: a language-model teacher as the cache stage runs it over a token shard.
- `next_token_loss`: a student's validation loss.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from kd_core.losses import DistillationObjective, TeacherMix, TeacherTargets, policy_gradient_reverse_kl, reported_kl, sampled_token_logprobs
from kd_core.models import left_padded, sequence_inputs
from kd_core.models.inference import CausalLMTeacher


class CausalLMStep(nn.Module):
    """`vocab_size`: the data's vocabulary; a student whose output layer is padded past it (a
    pretrained Qwen2: more rows than tokens) has its logits, or its output weight's rows, cut to it,
    so its distribution is over real tokens only, as the teacher's targets are. None: no cut."""

    def __init__(
        self, model: nn.Module, objective: DistillationObjective, fused_chunk_size: int | None = None, vocab_size: int | None = None,
        on_policy_objective: str = "divergence",
    ):
        super().__init__()
        self.model, self.objective, self.fused_chunk_size, self.vocab_size = model, objective, fused_chunk_size, vocab_size
        self.on_policy_objective = on_policy_objective
        """How a batch of the student's own answers (`sample_answers`) is learned: `divergence`
        (the objective without its cross-entropy term) or `policy_gradient`."""

    def forward(self, batch: dict[str, torch.Tensor], targets: TeacherTargets | None) -> dict[str, torch.Tensor]:
        """Loss terms of one batch of token rows (`input_ids`, the labels too; chat rows also
        `position_ids` and `loss_mask`, `sequence_inputs`). With `fused_chunk_size`, computed from
        the student's final hidden states chunk by chunk (`DistillationObjective.fused`), never
        from its full logits."""
        features = self.objective.features is not None
        input_ids = batch["input_ids"]
        inputs, counted = sequence_inputs(batch)
        if isinstance(targets, TeacherMix):
            return self.mixed(batch, inputs, input_ids, targets, counted)
        if counted is not None:
            targets = dataclasses.replace(targets or TeacherTargets(), mask=counted)
        if "sampler_logprobs" in batch:  # the student's own answers: never cross-entropy on them
            if self.on_policy_objective == "policy_gradient":
                return self.policy_gradient(batch, inputs, targets)
            with cross_entropy_off(self.objective):
                return self.divergence(batch, inputs, input_ids, targets, features)
        return self.divergence(batch, inputs, input_ids, targets, features)

    def divergence(self, batch, inputs, input_ids, targets, features) -> dict[str, torch.Tensor]:
        """The objective's terms (`forward`'s docstring)."""
        if self.fused_chunk_size:
            output = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
            weight = self.model.get_output_embeddings().weight[: self.vocab_size]
            return self.objective.fused(
                output.hidden_states[-1], weight, input_ids, targets, chunk_size=self.fused_chunk_size,
                student_hidden_states=output.hidden_states if features else None,
            )
        output = self.model(**inputs, output_hidden_states=features)
        return self.objective(output.logits[..., : self.vocab_size], input_ids, targets, student_hidden_states=output.hidden_states if features else None)

    def mixed(self, batch, inputs, input_ids, mix: TeacherMix, counted) -> dict[str, torch.Tensor]:
        """Several teachers' targets (`TeacherMix`): the student's logits once, the objective once per
        teacher on the positions it teaches, the terms summed with the parts' weights. Each
        teacher's KD summed over its tokens (`kd_<name>_sum`) and its tokens (`tokens_<name>`) are
        logged too; the loop turns them into its KD per token (`kd_<name>`) once averaged."""
        parts = mix.split(counted)
        if "sampler_logprobs" in batch and self.on_policy_objective == "policy_gradient":
            return self.policy_gradient(batch, inputs, mix.dense(counted), parts)
        logits = self.model(**inputs).logits[..., : self.vocab_size]
        terms: dict[str, torch.Tensor] = {}
        with cross_entropy_off(self.objective) if "sampler_logprobs" in batch else nullcontext():
            for name, weight, part in parts:
                part_terms = self.objective(logits, input_ids, part)
                for term in ("loss", "ce", "kd"):
                    value = weight * (part_terms[term] if term == "loss" else part_terms[term].detach())
                    terms[term] = terms[term] + value if term in terms else value
                tokens = part.mask.sum().float() if part.mask is not None else torch.tensor(float(input_ids.numel()))
                terms[f"kd_{name}_sum"], terms[f"tokens_{name}"] = part_terms["kd"].detach() * tokens, tokens
        return terms

    def policy_gradient(self, batch, inputs, targets: TeacherTargets, parts=()) -> dict[str, torch.Tensor]:
        """The sampled-token reverse-KL advantage with a policy-gradient update, weighted by the
        objective's `kd_weight` (`kd_core/losses/policy_gradient.py`): position t's log-probs of
        sampled token t + 1, the student's (with gradient), the sampler's and the teacher's.
        `parts`: routed teachers' (name, weight, targets with their mask), whose sampled reverse KL
        and tokens are logged as `mixed` logs them."""
        ids = inputs["input_ids"]
        logits = self.model(**inputs).logits[..., : self.vocab_size]
        student = sampled_token_logprobs(logits[:, :-1], ids[:, 1:])
        teacher = sampled_token_logprobs(targets.logits[:, :-1, : logits.shape[-1]], ids[:, 1:])
        sampler, mask = batch["sampler_logprobs"][:, 1:], targets.mask[:, :-1]
        policy = policy_gradient_reverse_kl(student, sampler, teacher, mask=mask)
        # Logged as every other batch's terms: `ce`, the student's NLL of its own answer; `kd`, the sampled reverse KL.
        nll = -(torch.where(mask, student, 0.0).sum() / mask.sum().clamp_min(1)).detach()
        terms = {"ce": nll, "kd": reported_kl(sampler, teacher, mask), "loss": self.objective.kd_weight * policy}
        for name, _, part in parts:
            own = part.mask[:, :-1]
            tokens = own.sum().float()
            terms[f"kd_{name}_sum"], terms[f"tokens_{name}"] = reported_kl(sampler, teacher, own) * tokens, tokens
        return terms


@contextmanager
def cross_entropy_off(objective: DistillationObjective):
    """The objective with its cross-entropy term weighted 0 (a batch of the student's own samples)."""
    weight, objective.ce_weight = objective.ce_weight, 0.0
    try:
        yield objective
    finally:
        objective.ce_weight = weight


class CachedLMTargets:
    """The cache's view of a language-model teacher: a token shard's cache columns."""

    def __init__(self, teacher: CausalLMTeacher, device: str):
        self.teacher, self.device = teacher, device

    def columns(self, shard: dict[str, np.ndarray], batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """`seed` seeds the draws of a sampled cache (on the teacher's device)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.teacher.columns(shard["input_ids"], batch_size, generator, shard.get("position_ids"))


def next_token_loss(model, rows: dict[str, torch.Tensor], batch_size: int, device, vocab_size: int | None = None) -> float:
    """A causal LM's mean next-token cross-entropy (nats/token, float32) over `rows` (columns
    as a batch holds them), at the positions that count (`sequence_inputs`), its logits cut to
    the data's `vocab_size` (a padded output layer's extra rows dropped; None: no cut)."""
    total, count = 0.0, 0
    for start in range(0, len(rows["input_ids"]), batch_size):
        inputs, counted = sequence_inputs({name: values[start : start + batch_size].to(device) for name, values in rows.items()})
        ids = inputs["input_ids"]
        logits = model(**inputs).logits.float()[:, :-1, :vocab_size].flatten(0, 1)
        losses = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten(), reduction="none")
        keep = torch.ones_like(losses, dtype=torch.bool) if counted is None else counted[:, :-1].flatten()
        total += float(losses[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


class RealTokensOnly:
    """A generation logits processor: a model whose output layer is padded past the data's
    vocabulary (a pretrained Qwen2) never samples a padding row."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size :] = -float("inf")
        return scores


@torch.no_grad()
def sample_answers(
    student, batch: dict[str, torch.Tensor], settings, stop_ids: list[int], pad_id: int, seq_len: int, vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The student's own answers to a batch of chat rows: the prompt of each row's first
    conversation (`kd_core.data.chat.conversation_prompts`), answered `settings.samples_per_prompt`
    times by sampling (`temperature`, `top_p`, at most `max_new_tokens`, ending at a stop token,
    which is kept), as chat rows of `seq_len`: `input_ids` (prompt, answer, padding),
    `position_ids`, `loss_mask` over the answer, `tag_ids` (the prompt's tag, when the batch has
    them), and `sampler_logprobs`, the sampling distribution's log-prob of each answer token at
    the token's own index (0 elsewhere): what the policy-gradient objective's importance ratio
    divides by. With `vocab_size`, only the
    data's tokens are sampled (`RealTokensOnly`)."""
    from transformers import LogitsProcessorList

    from kd_core.data.chat import conversation_prompts

    device = batch["input_ids"].device
    found = [p for row in range(len(batch["input_ids"])) for p in conversation_prompts({name: values[row : row + 1] for name, values in batch.items()}, 1)]
    if not found:  # no row holds an answered conversation: nothing to answer, the dataset's rows train
        return batch
    prompts = [p.prompt[-(seq_len - 1) :] for p in found]
    input_ids, attention = left_padded(prompts, pad_id, device)
    was_training = student.training
    student.eval()
    try:
        output = student.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
            repetition_penalty=1.0,  # exactly the configured distribution, whatever generation_config.json says
            max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples_per_prompt, eos_token_id=stop_ids,
            pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([RealTokensOnly(vocab_size)] if vocab_size else []),
        )
    finally:
        student.train(was_training)
    answers = output.sequences[:, input_ids.shape[1] :]
    sampler = torch.stack(output.scores, 1).float().log_softmax(-1).gather(-1, answers.unsqueeze(-1)).squeeze(-1)  # the processed scores: what was sampled from
    rows = len(answers)
    columns = {
        "input_ids": torch.full((rows, seq_len), pad_id, dtype=torch.long, device=device),
        "position_ids": torch.zeros((rows, seq_len), dtype=torch.long, device=device),
        "loss_mask": torch.zeros((rows, seq_len), dtype=torch.uint8, device=device),
        "sampler_logprobs": torch.zeros((rows, seq_len), dtype=torch.float32, device=device),
    }
    if "tag_ids" in batch:  # each answer keeps its prompt's tag (what distill.route reads)
        columns["tag_ids"] = torch.full((rows, seq_len), -1, dtype=batch["tag_ids"].dtype, device=device)
    for row in range(rows):
        prompt = prompts[row // settings.samples_per_prompt]
        answer = answers[row].tolist()
        end = next((index + 1 for index, token in enumerate(answer) if token in stop_ids), len(answer))  # the stop token is learned too
        length = min(len(prompt) + end, seq_len)
        kept = length - len(prompt)
        columns["input_ids"][row, :length] = torch.tensor(prompt + answer[:kept], device=device)
        columns["position_ids"][row, :length] = torch.arange(length, device=device)
        columns["position_ids"][row, length:] = torch.arange(seq_len - length, device=device)  # the padding: a sequence of its own
        columns["loss_mask"][row, len(prompt) : length] = 1
        columns["sampler_logprobs"][row, len(prompt) : length] = sampler[row, :kept]
        if "tag_ids" in columns:
            columns["tag_ids"][row, :length] = found[row // settings.samples_per_prompt].tag
    return columns
