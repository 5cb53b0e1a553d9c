"""The combined distillation objective: hard-label cross-entropy plus a KD term.

    total = w_ce · CE(student, next tokens) + w_kd · b · s · KD(teacher ‖ student at T)

- w_ce = `ce_weight`, w_kd = `kd_weight`: explicit weights per term (no hidden 1 − w mixing).
- s = T² when `scale_by_temperature_squared` (so the KD gradient keeps its size as T changes,
  Hinton et al., 2015), else 1.
- b = 1, or with `balance_terms` the running ratio EMA(|CE|) / EMA(|KD|) (detached), so that
  two terms whose magnitudes differ by orders of magnitude contribute alike.
- KD is per position, optionally weighted by teacher confidence (`token_weighting =
  "teacher_confidence"`: weight 1 − H_t / log V from the teacher's entropy, normalised to mean 1
  over valid positions, so confident teacher predictions count more).

The teacher's targets come as one `TeacherTargets` (`targets.py`): top-k (`topk_logprobs`,
`topk_ids`: forward KL via `topk_kl`, any other `divergence` over the top k and the tail bucket,
`topk.coarsened`), cached samples (`sample_ids`, `sample_counts`: `sampled_kl`) or full logits
(`logits`: the configured `divergence`, from `divergences.py`), with `entropy` for
the token weighting and `mask` for the positions that count. With no targets, or w_kd = 0, it is
plain cross-entropy: the no-teacher baseline and teacher training share it. With `feature_weight`
w_f > 0, w_f · hidden-state distillation (`features.py`: mapped layer pairs, learned projections
that train with the student, against `targets.hidden`) is added to the total.
Float32 throughout; masked positions never count; an all-masked batch gives 0.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.common import log_probs, masked_mean
from kd_core.losses.divergences import divergence_named
from kd_core.losses.features import HiddenStateDistillation
from kd_core.losses.fused import FusedTerm, fused_lm_head_loss, fused_lm_head_terms
from kd_core.losses.sampled import sampled_kl_per_position
from kd_core.losses.targets import TeacherTargets
from kd_core.losses.topk import coarsened, topk_kl_per_position

if TYPE_CHECKING:  # kd_core.config imports the losses, never the other way round at import time
    from kd_core.config import LossConfig


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of predicting input_ids[:, t+1] from logits[:, t] over the positions t that count
    (`mask` (B, T), as `TeacherTargets.mask`; a row's last position predicts nothing). logits
    (B, T, V), input_ids (B, T)."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    )
    counted = None if mask is None else mask[:, :-1].flatten()
    return masked_mean(per_token, counted)


def confidence_weights(teacher_entropy: torch.Tensor, vocab_size: int, mask: torch.Tensor | None) -> torch.Tensor:
    """1 − H/log V per position, rescaled to mean 1 over valid positions (a valid weighting of a mean)."""
    raw = (1 - teacher_entropy.float() / math.log(vocab_size)).clamp_min(0)
    return raw / masked_mean(raw, mask).clamp_min(1e-6)


class DistillationObjective(nn.Module):
    """The combined objective of the module docstring. Its keyword parameters are `LossConfig`'s
    fields (`from_config` passes them one by one), plus the student's and the teacher's hidden
    widths for the feature projections."""

    def __init__(
        self,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        topk_tail: bool = True,
        divergence: str = "forward_kl",
        divergence_parameter: float | None = None,
        token_weighting: str = "none",
        balance_terms: bool = False,
        balance_momentum: float = 0.9,
        feature_weight: float = 0.0,
        feature_layers: list[tuple[int, int]] = (),
        feature_kind: str = "mse",
        student_hidden_size: int | None = None,
        teacher_hidden_size: int | None = None,
    ):
        super().__init__()
        registered = divergence_named(divergence)
        if token_weighting not in ("none", "teacher_confidence"):
            raise ValueError(f"token_weighting must be 'none' or 'teacher_confidence', got {token_weighting!r}")
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.kd_scale = temperature**2 if scale_by_temperature_squared else 1.0
        self.topk_tail, self.token_weighting = topk_tail, token_weighting
        self.divergence = divergence
        parameters = registered.parameters(divergence_parameter)
        self.dense_divergence = partial(registered.per_position, **parameters)
        # its value and gradient, for `fused` (None: autograd on each chunk)
        self.dense_closed_form = None if registered.closed_form is None else partial(registered.closed_form, **parameters)
        self.balance_terms, self.balance_momentum = balance_terms, balance_momentum
        self.register_buffer("running_magnitudes", torch.zeros(2))  # EMA of |CE|, |KD|; 0 = not started
        self.feature_weight = feature_weight
        self.features = None
        if feature_weight > 0:
            if not (student_hidden_size and teacher_hidden_size):
                raise ValueError("feature_weight > 0 needs student_hidden_size and teacher_hidden_size for the projections")
            self.features = HiddenStateDistillation([tuple(pair) for pair in feature_layers], student_hidden_size, teacher_hidden_size, feature_kind)

    @classmethod
    def from_config(cls, loss: LossConfig, *, student_hidden_size: int | None, teacher_hidden_size: int | None) -> DistillationObjective:
        """The objective `distill.loss` configures (its `fused` and `fused_chunk_size` choose how the
        training step calls it: `forward` or `fused`)."""
        return cls(
            ce_weight=loss.ce_weight,
            kd_weight=loss.kd_weight,
            temperature=loss.temperature,
            scale_by_temperature_squared=loss.scale_by_temperature_squared,
            topk_tail=loss.topk_tail,
            divergence=loss.divergence,
            divergence_parameter=loss.divergence_parameter,
            token_weighting=loss.token_weighting,
            balance_terms=loss.balance_terms,
            balance_momentum=loss.balance_momentum,
            feature_weight=loss.feature_weight,
            feature_layers=loss.feature_layers,
            feature_kind=loss.feature_kind,
            student_hidden_size=student_hidden_size,
            teacher_hidden_size=teacher_hidden_size,
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        targets: TeacherTargets | None = None,
        *,
        student_hidden_states=None,
    ) -> dict[str, torch.Tensor]:
        """Student logits (B, T, V) and the token ids (B, T) whose next token each position
        predicts, against the teacher's `targets` (None: cross-entropy alone, every position).
        Returns {'loss': total, 'ce': ..., 'kd': ...} (kd only when `targets` has token targets;
        'feature' when `feature_weight` > 0, from `student_hidden_states`, a sequence by layer as
        Hugging Face gives it, and `targets.hidden`)."""
        targets = TeacherTargets() if targets is None else targets
        mask = targets.mask
        terms = {"ce": next_token_cross_entropy(student_logits, labels, mask)}
        has_targets = targets.has_token_targets()
        if not has_targets or self.kd_weight == 0:
            return self._add_features(self._without_kd(terms, has_targets), student_hidden_states, targets)
        per_position = self._kd_per_position(
            student_logits, targets.topk_logprobs, targets.topk_ids, targets.sample_ids, targets.sample_counts, targets.logits
        )
        weights = self._token_weights(targets.entropy, student_logits.shape[-1], mask)
        terms["kd"] = masked_mean(per_position if weights is None else per_position * weights, mask)
        return self._add_features(self._total(terms), student_hidden_states, targets)

    def fused(
        self,
        student_hidden: torch.Tensor,
        output_weight: torch.Tensor,
        labels: torch.Tensor,
        targets: TeacherTargets | None = None,
        *,
        chunk_size: int = 1024,
        student_hidden_states=None,
    ) -> dict[str, torch.Tensor]:
        """`forward`'s terms from the student's final hidden states (B, T, H) and output weight
        (V, H), computed `chunk_size` positions at a time (`kd_core.losses.fused`): the student's
        (B·T, V) logits never exist at once. CE and KD share one pass over the logits (with
        `balance_terms`, one pass each); the returned `ce` and `kd` are values for logging, `loss`
        carries the gradient. Same values and gradients as `forward`."""
        targets = TeacherTargets() if targets is None else targets
        mask = targets.mask
        batch, length, width = student_hidden.shape
        hidden = student_hidden.reshape(batch * length, width)
        # CE: position t predicts token t+1 and counts when that token is valid; a row's last position has none.
        next_tokens = labels.roll(-1, dims=1).reshape(-1)
        has_next = torch.zeros(batch, length, dtype=torch.bool, device=labels.device)
        has_next[:, :-1] = True if mask is None else mask[:, :-1]

        def ce_chunk(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
            return F.cross_entropy(student_logits, next_tokens[rows], reduction="none")

        def ce_value_and_grad(student_logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            """CE = logsumexp(z) − z_y and ∂CE/∂z = softmax(z) − onehot(y), without autograd."""
            next_ids = next_tokens[rows].unsqueeze(-1)
            logprobs = torch.log_softmax(student_logits, -1)
            return -logprobs.gather(-1, next_ids).squeeze(-1), logprobs.exp_().scatter_add_(-1, next_ids, -torch.ones_like(next_ids, dtype=logprobs.dtype))

        ce_chunk.value_and_grad = ce_value_and_grad
        ce = FusedTerm(ce_chunk, has_next.reshape(-1))
        has_targets = targets.has_token_targets()
        if not has_targets or self.kd_weight == 0:
            terms = {"ce": fused_lm_head_loss(hidden, output_weight, ce_chunk, mask=ce.mask, chunk_size=chunk_size)}
            return self._add_features(self._without_kd(terms, has_targets), student_hidden_states, targets)
        flat = lambda values: None if values is None else values.reshape(batch * length, *values.shape[2:])  # noqa: E731
        topk_logprobs, topk_ids, sample_ids, sample_counts, dense = map(
            flat, (targets.topk_logprobs, targets.topk_ids, targets.sample_ids, targets.sample_counts, targets.logits)
        )
        flat_mask = None if mask is None else mask.reshape(-1)
        flat_entropy = None if targets.entropy is None else targets.entropy.reshape(-1)
        weights = self._token_weights(flat_entropy, output_weight.shape[0], flat_mask)

        def kd_chunk(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
            per_position = self._kd_per_position(
                student_logits,
                *(None if values is None else values[rows] for values in (topk_logprobs, topk_ids, sample_ids, sample_counts, dense)),
            )
            return per_position if weights is None else per_position * weights[rows]

        closed = None if dense is None else self.dense_closed_form
        if closed is not None:  # full teacher logits: the divergence's closed-form gradient, no autograd

            def kd_value_and_grad(student_logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
                teacher_logprobs = log_probs(dense[rows], self.temperature)
                value, gradient = closed(log_probs(student_logits, self.temperature), teacher_logprobs, self.temperature)
                return (value, gradient) if weights is None else (value * weights[rows], gradient * weights[rows].unsqueeze(-1))

            kd_chunk.value_and_grad = kd_value_and_grad
        kd = FusedTerm(kd_chunk, flat_mask)
        if self.balance_terms:  # the balance needs both values first: one pass per term
            terms = {name: fused_lm_head_loss(hidden, output_weight, term.chunk_loss, mask=term.mask, chunk_size=chunk_size)
                     for name, term in (("ce", ce), ("kd", kd))}
            return self._add_features(self._total(terms), student_hidden_states, targets)
        # Fixed weights: both terms from one pass over the logits (one set of LM-head matmuls).
        ce.weight, kd.weight = self.ce_weight, self.kd_weight * self.kd_scale
        total, terms = fused_lm_head_terms(hidden, output_weight, {"ce": ce, "kd": kd}, chunk_size=chunk_size)
        return self._add_features(terms | {"loss": total}, student_hidden_states, targets)

    def _without_kd(self, terms: dict[str, torch.Tensor], has_targets: bool) -> dict[str, torch.Tensor]:
        """Cross-entropy alone: weighted when teacher targets were given but kd_weight is 0."""
        terms["loss"] = self.ce_weight * terms["ce"] if has_targets else terms["ce"]
        return terms

    def _token_weights(self, teacher_entropy, vocab_size: int, mask) -> torch.Tensor | None:
        """Per-position KD weights (`token_weighting`), or None for uniform weights."""
        if self.token_weighting != "teacher_confidence":
            return None
        if teacher_entropy is None:
            raise ValueError("token_weighting='teacher_confidence' needs teacher_entropy (targets.entropy; the cache stores it)")
        return confidence_weights(teacher_entropy, vocab_size, mask)

    def _add_features(self, terms, student_hidden_states, targets: TeacherTargets) -> dict[str, torch.Tensor]:
        if self.features is None:
            return terms
        if student_hidden_states is None or not targets.hidden:
            raise ValueError("feature_weight > 0 needs student and teacher hidden states (cache.hidden_layers, or an online teacher)")
        terms["feature"] = self.features(student_hidden_states, targets.hidden, targets.mask)
        terms["loss"] = terms["loss"] + self.feature_weight * terms["feature"]
        return terms

    def _total(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        balance = self._balance(terms["ce"], terms["kd"]) if self.balance_terms else 1.0
        terms["loss"] = self.ce_weight * terms["ce"] + self.kd_weight * balance * self.kd_scale * terms["kd"]
        return terms

    def _kd_per_position(self, student_logits, topk_logprobs, topk_ids, sample_ids, sample_counts, teacher_logits):
        student_logprobs = log_probs(student_logits, self.temperature)
        if teacher_logits is not None:
            return self.dense_divergence(student_logprobs, log_probs(teacher_logits, self.temperature))
        if sample_ids is not None:
            return sampled_kl_per_position(student_logprobs, sample_ids, sample_counts)
        if self.divergence != "forward_kl":
            if not self.topk_tail:
                raise ValueError(f"divergence {self.divergence!r} compares top-k targets over the top k and the tail bucket: set topk_tail")
            return self.dense_divergence(*coarsened(student_logprobs, topk_logprobs, topk_ids))
        return topk_kl_per_position(student_logprobs, topk_logprobs, topk_ids, temperature=self.temperature, tail=self.topk_tail)

    @torch.no_grad()
    def _balance(self, ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        current = torch.stack([ce.detach().abs(), kd.detach().abs()])
        if self.training:
            started = self.running_magnitudes.sum() > 0
            momentum = self.balance_momentum if started else 0.0
            self.running_magnitudes.mul_(momentum).add_((1 - momentum) * current)
        ce_magnitude, kd_magnitude = self.running_magnitudes
        return ce_magnitude / kd_magnitude.clamp_min(1e-8)
