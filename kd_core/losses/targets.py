"""`TeacherTargets`: everything a student learns from its teacher, as one frozen value.

A language-model student learns from one kind of token-level target per batch: the teacher's
dense logits (an online teacher, or a `full` cache), its top-k ids and log-probs (a `topk`
cache) or its sampled ids and counts (a `sampled` cache); the teacher's predictive entropy
(every cache format) weights positions when `token_weighting` asks for it, and hidden states
(`cache.hidden_layers`, or an online teacher's) feed feature distillation. A reward-model
student learns from the teacher's scores of both responses of each preference pair, an embedding
student from the teacher's embedding of each text, a tabular student from the teacher's prediction
of each row.

Fields (every one optional: None, or an empty `hidden`, when the batch does not carry it;
B rows, T positions, V vocabulary entries, k top-k slots, n sample slots, H hidden width):

- `logits` (`teacher_logits`): (B, T, V) float, the teacher's logits. A `full` cache gives its
  log-probs times the cache temperature: logits up to a per-position constant.
- `topk_ids` (`teacher_topk_ids`): (B, T, k) int32 (int64 works too), the teacher's k most
  likely next tokens.
- `topk_logprobs` (`teacher_topk_logprobs`): (B, T, k) float32, their log-probs at the cache
  temperature. With a stored tail the cache decoder has already shifted them so that
  Σ p + p_tail = 1: the tail mass is 1 − Σ exp(topk_logprobs), not a field of its own.
- `sample_ids`, `sample_counts` (`teacher_sample_ids`, `teacher_sample_counts`): (B, T, n) int32,
  the distinct ids drawn from the teacher and how often each was drawn (0: an unused slot).
- `entropy` (`teacher_entropy`): (B, T) float32, the teacher's full predictive entropy (nats).
- `token_logprobs` (`teacher_token_logprobs`): (B, T) float32, the teacher's log-prob (at the
  cache temperature) of the token that follows position t in its own view of the row: what a
  student with another tokenizer merges into a span's probability (`cache.token_logprobs`).
- `hidden` (`teacher_hidden_<L>`): {L: (B, T, H)} float32 (an online teacher: its dtype), the
  teacher's hidden state of layer L (a Hugging Face `hidden_states` index); {} when none.
- `chosen_rewards`, `rejected_rewards` (`teacher_chosen`, `teacher_rejected`): (N,) float32, a
  reward teacher's scores of each preference pair's chosen and rejected response.
- `embeddings` (`teacher_embedding`): (N, D) float32, a sentence encoder's embedding of each of
  the batch's N texts (`task: embedding`).
- `predictions` (`teacher_prediction`): (N, C) float32, a tabular teacher's log-probability of each
  class for each of the batch's N rows (−inf for a class it gives probability 0), or (N, 1) its
  prediction of a regression target (`task: tabular`).
- `mask`: (B, T) bool, the positions that count (None: every one): position t counts when the
  token after it, t + 1, is one the student learns to write (chat data: an assistant token).
  No batch key: the language model's step builds it from the batch's `loss_mask`.

The batch keys are those `kd_core.cache.format.CacheLayout.decode` yields into the training
stream's batches (`BATCH_KEYS`); `from_batch` is the one place that maps them to fields. An online
teacher builds its `TeacherTargets` directly (`kd_core/train/targets.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

HIDDEN_PREFIX = "teacher_hidden_"
"""Batch key prefix of a teacher hidden state: `teacher_hidden_<L>` for layer L."""

BATCH_KEYS: dict[str, str] = {
    "teacher_logits": "logits",
    "teacher_topk_ids": "topk_ids",
    "teacher_topk_logprobs": "topk_logprobs",
    "teacher_sample_ids": "sample_ids",
    "teacher_sample_counts": "sample_counts",
    "teacher_entropy": "entropy",
    "teacher_token_logprobs": "token_logprobs",
    "teacher_chosen": "chosen_rewards",
    "teacher_rejected": "rejected_rewards",
    "teacher_embedding": "embeddings",
    "teacher_prediction": "predictions",
}
"""Batch key -> `TeacherTargets` field, for every target key but the hidden states (`HIDDEN_PREFIX`)."""


def hidden_key(layer: int) -> str:
    """The batch key of the teacher's hidden state of `layer`."""
    return f"{HIDDEN_PREFIX}{layer}"


def batch_keys(hidden_layers: tuple[int, ...] | list[int] = ()) -> tuple[str, ...]:
    """The batch keys `TeacherTargets.from_batch` reads: every fixed one, then one per hidden layer."""
    return (*BATCH_KEYS, *(hidden_key(layer) for layer in hidden_layers))


@dataclass(frozen=True, slots=True, eq=False)
class TeacherTargets:
    """What a student learns from its teacher (see the module docstring for each field's shape
    and dtype). Frozen: build a new one (`dataclasses.replace`) rather than change one. Compared
    by identity (tensors have no single truth value to compare by)."""

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_counts: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None
    hidden: Mapping[int, torch.Tensor] = field(default_factory=dict)
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def has_token_targets(self) -> bool:
        """Whether there is a token-level distribution to distil: dense logits, top-k or samples."""
        return self.logits is not None or self.topk_logprobs is not None or self.sample_ids is not None

    def has_rewards(self) -> bool:
        """Whether both reward scores of each preference pair are given."""
        return self.chosen_rewards is not None and self.rejected_rewards is not None

    def to(self, device: torch.device | str) -> TeacherTargets:
        """The same targets with every tensor on `device`."""
        moved = {name: value.to(device) for name in BATCH_KEYS.values() if (value := getattr(self, name)) is not None}
        mask = None if self.mask is None else self.mask.to(device)
        return dataclasses.replace(self, **moved, hidden={layer: state.to(device) for layer, state in self.hidden.items()}, mask=mask)

    def top_k(self, k: int, temperature: float) -> TeacherTargets:
        """Dense `logits` replaced by the teacher's k most likely tokens (at most its vocabulary)
        and their log-probs at `temperature` (float32), as a top-k cache holds them."""
        logprobs = torch.log_softmax(self.logits.float() / temperature, dim=-1)
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return dataclasses.replace(self, logits=None, topk_logprobs=values, topk_ids=ids.to(torch.int32))

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        """The targets under a training batch's `teacher_*` keys (`BATCH_KEYS`, `teacher_hidden_<L>`);
        its other keys (input ids, images, human labels) are not targets and are left alone. A
        `teacher_*` key that is neither raises ValueError (a renamed column must not go unread)."""
        fields, hidden = {}, {}
        for name, value in batch.items():
            if name in BATCH_KEYS:
                fields[BATCH_KEYS[name]] = value
            elif name.startswith(HIDDEN_PREFIX):
                hidden[int(name[len(HIDDEN_PREFIX) :])] = value
            elif name.startswith("teacher_"):
                raise ValueError(f"batch key {name!r} is not a teacher target; known: {', '.join(batch_keys())}, {HIDDEN_PREFIX}<layer>")
        return cls(**fields, hidden=hidden)



@dataclass(frozen=True, eq=False)
class TeacherMix:
    """Several teachers' targets for one batch (`teachers:`): `parts[name]` teaches the positions
    of `positions[name]` ((B, T) bool; None: every position). With `weights` (`teacher_weights`,
    summing to 1) every part teaches its positions with its fixed weight; without (`route`: the
    positions are a partition), each part's weight is its share of the counted positions, so the
    weighted sum is the mean over all of them, whichever teacher scored each."""

    parts: Mapping[str, TeacherTargets]
    positions: Mapping[str, torch.Tensor | None]
    weights: Mapping[str, float] | None = None

    def split(self, counted: torch.Tensor | None) -> list[tuple[str, torch.Tensor | float, TeacherTargets]]:
        """(name, weight, targets with the part's mask: its positions that count) per part."""
        masks = {}
        for name in self.parts:
            positions, mask = self.positions.get(name), counted
            if positions is not None:
                mask = positions if mask is None else mask & positions
            masks[name] = mask
        if self.weights is not None:
            return [(name, self.weights[name], dataclasses.replace(self.parts[name], mask=masks[name])) for name in self.parts]
        counts = {name: mask.sum().float() for name, mask in masks.items()}  # routed parts always have positions
        total = sum(counts.values()).clamp_min(1)
        return [(name, counts[name] / total, dataclasses.replace(self.parts[name], mask=masks[name])) for name in self.parts]

    def dense(self, counted: torch.Tensor | None) -> TeacherTargets:
        """One set of dense targets whose logits at each position are its routed teacher's (a route
        only), masked to `counted`: what the policy-gradient objective reads."""
        logits = None
        for name, part in self.parts.items():
            positions = self.positions.get(name)
            if positions is None:
                raise ValueError("a part that teaches every position: the teachers are weighted, not routed")
            chosen = torch.where(positions.unsqueeze(-1), part.logits.float(), 0.0)
            logits = chosen if logits is None else logits + chosen
        return TeacherTargets(logits=logits, mask=counted)

    def to(self, device) -> TeacherMix:
        return TeacherMix(
            {name: part.to(device) for name, part in self.parts.items()},
            {name: None if mask is None else mask.to(device) for name, mask in self.positions.items()},
            self.weights,
        )
