"""Cross-tokenizer distillation: a teacher and a student with different tokenizers read the same text.

An alignment (built by the data layer) groups the two token sequences into spans covering the same
characters. `AlignedSpans` gives each span as the positions that *predict* its tokens (causal LMs:
the token at index j is predicted at position j − 1): span s is batch row `rows[s]`, teacher
positions `teacher_start[s] .. teacher_end[s] − 1`, student positions `student_start[s] ..
student_end[s] − 1` (end exclusive). S is the number of spans; V_S, V_T the vocabulary sizes.

Span log-probability (`span_logprobs`). With token_logprobs (B, L), where token_logprobs[b, i] =
log p(x_{i+1} | x_{≤i}), the span's text has log-probability

    log p(span) = Σ_{i = start}^{end − 1} token_logprobs[rows, i]          (S,)

computed as a difference of one cumulative sum C (B, L + 1), C[b, 0] = 0: C[rows, end] − C[rows,
start]. The cumulative sum is accumulated in float64 (returned as float32): in float32 a row's
running sum reaches 10⁴ and more, where its resolution (~10⁻³) would swamp short spans.
Non-finite token log-probs (e.g. −inf at padding) are floored at −10⁴ so that they cannot poison
the spans after them with ∞ − ∞.

ULD, Universal Logit Distillation (Boizard et al. 2024; `uld_per_span`). With p = exp(student
log-probs) (S, V_S) and q = exp(teacher log-probs) (S, V_T), each sorted in decreasing order and the
shorter zero-padded to V = max(V_S, V_T):

    ULD = Σ_{i < V} |sort↓(p)_i − sort↓(q)_i|                              (S,)

the Wasserstein-1 distance between the two sorted distributions (it ignores which token is which,
so it needs no vocabulary mapping). From a cached top-k teacher (`uld_topk_per_span`, teacher
log-probs (S, k)): the teacher's k probabilities sorted, plus its tail 1 − Σ q as one entry, are
compared with the student's k largest probabilities plus its tail 1 − Σ top-k(p) as one entry:

    ULD_k = Σ_{i < k} |top-k↓(p)_i − sort↓(q)_i| + |(1 − Σ top-k(p)) − (1 − Σ q)|

When k = V_T this is exactly ULD: the teacher's tail is 0, and beyond the k-th entry the exact form
compares the student's remaining entries with zeros, whose sum is the student's tail. (If V_S < k
the student's side is zero-padded and its tail is 0.)

Span-aligned KL (GOLD-style hybrid; `span_kl_per_span`). At the span's first predicting position,
the student's full distribution log p_S (S, V_S) and the teacher's distribution given sparsely as ids
(S, k) and log-probs (S, k) (a full distribution is ids = arange(V_T)). `student_shared` (V_S,) and
`teacher_shared` (V_T,) map each id to the index 0..M−1 of its normalised string when that string is
in both vocabularies (several ids may share an index: their probabilities are summed), else −1.
The outcomes compared on each side:

    (i)   the span's text:          P(span) = exp(*_span_logprob)
    (ii)  each shared string m, except the strings of the span's first token on either side
          (`teacher_first`, `student_first`; their mass overlaps (i); an id mapped to −1 excludes
          nothing):                 P(m) = Σ_{id : shared[id] = m} p(id)
    (iii) one bucket, everything else: P(rest) = max(1 − P(span) − Σ_m P(m), 10⁻³⁰)

and the loss per span is

    span_kl = Σ_o P_T(o) (log P_T(o) − log P_S(o))  +  uld_weight · ULD(unmatched)     (S,)

with 0·log 0 = 0 (`common.kl_terms`) and the student's probabilities floored at 10⁻³⁰ inside the
log (so an underflowed student probability gives a large finite term, not ∞). ULD(unmatched) is
Σ_i |a_i − b_i| between the teacher's given probabilities of unmatched ids (mapped to −1) sorted
decreasingly, b (S, k), and the student's unmatched probabilities sorted decreasingly and truncated
to the teacher's given count k, a (S, k) (zero-padded if V_S < k). The truncation keeps the term
O(S·k) after one top-k, and matches what is known of the teacher: its unmatched mass beyond the k
given ids is unknown, so the student's entries beyond k would only be compared with zeros.
The shared masses are `scatter_add`ed into (S, C + 1) with C = min(V_S, V_T) ≥ M (every shared
string has at least one id on each side) and a dummy column C for −1, so no device sync is needed
to learn M; the unused columns are 0 on both sides and contribute nothing. Memory: O(S · (V_S + C)).
All inputs are log-probabilities at one temperature (the span log-probs included).

DSKD, dual-space KD with cross-model attention (Zhang et al., EMNLP 2024; `DualSpaceDistillation`).
Shapes: student (B, L_s), teacher (B, L_t); hidden sizes d_S, d_T; embedding sizes e_S, e_T;
attention size A (default d_T). Learned, bias-free:

    Q = W_q [E_S(x_i); E_S(x_{i+1})]    (B, L_s, A)      W_q: 2 e_S → A
    K = W_k [E_T(y_j); E_T(y_{j+1})]    (B, L_t, A)      W_k: 2 e_T → A
    a^{T→S} = softmax_j(Q Kᵀ / √A) over valid teacher positions j      (B, L_s, L_t)
    a^{S→T} = softmax_i(K Qᵀ / √A) over valid student positions i      (B, L_t, L_s)
    h^{T→S} = a^{T→S} (W_{T→S} h_T)      (B, L_s, d_S)    W_{T→S}: d_T → d_S
    h^{S→T} = a^{S→T} (W_{S→T} h_S)      (B, L_t, d_T)    W_{S→T}: d_S → d_T
    p_{T→S} = softmax(student_head(h^{T→S}) / τ),  p_{S→T} = softmax(teacher_head(h^{S→T}) / τ)

The attention is not causal: each position attends over the whole other sequence of the same text.
Terms (float32 scalars; masked means, an all-masked batch gives 0):

    student_space = mean over valid student positions of KL(stopgrad(p_{T→S}) ‖ softmax(student_logits / τ))
    teacher_space = mean over valid teacher positions of KL(softmax(teacher_logits / τ) ‖ p_{S→T})
    projector_ce  = mean over valid student positions of −log softmax(student_head(h^{T→S}))[next id]
    loss          = student_space + teacher_space + projector_ce

projector_ce is at temperature 1 (it is a cross-entropy on the data's next tokens). Gradients:
student_space reaches only the student's logits; projector_ce trains W_q, W_k, W_{T→S} and reaches
whatever parameters `student_head` uses — the module detaches nothing inside the head; a caller who
wants the projector's cross-entropy to leave the student's output layer alone passes a head with
detached weights, e.g. `lambda h: h @ lm_head.weight.detach().T`; teacher_space trains the student's
hidden states, W_{S→T}, W_q and W_k (through a^{S→T}); the teacher's inputs are detached. A position
counts only where its own mask is true and its row has at least one valid position on the other side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kd_core.losses.common import kl_terms, log_probs, masked_mean

_TINY = 1e-30
_LOG_FLOOR = -1e4


@dataclass(frozen=True)
class AlignedSpans:
    """Spans of the same characters in both token sequences of a batch, as the positions that predict their tokens:
    the span's first token is predicted at position `*_start` and its tokens at `*_start .. *_end - 1`."""

    rows: torch.Tensor  # (S,) long, batch row
    teacher_start: torch.Tensor  # (S,) long
    teacher_end: torch.Tensor  # (S,) long, > teacher_start
    student_start: torch.Tensor  # (S,) long
    student_end: torch.Tensor  # (S,) long, > student_start

    def __post_init__(self):
        shapes = {name: tuple(getattr(self, name).shape) for name in ("rows", "teacher_start", "teacher_end", "student_start", "student_end")}
        if len(set(shapes.values())) != 1 or len(shapes["rows"]) != 1:
            raise ValueError(f"AlignedSpans fields must all be 1-D of one length S, got shapes {shapes}")

    def to(self, device) -> "AlignedSpans":
        return AlignedSpans(
            self.rows.to(device),
            self.teacher_start.to(device),
            self.teacher_end.to(device),
            self.student_start.to(device),
            self.student_end.to(device),
        )

    def __len__(self) -> int:
        return int(self.rows.shape[0])


# ---------------------------------------------------------------- span log-probabilities
def span_logprobs(token_logprobs: torch.Tensor, spans_rows: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Σ_{i=start}^{end-1} token_logprobs[rows, i] per span: token_logprobs (B, L), the rest (S,) long;
    returns (S,) float32 (accumulated in float64, see the module docstring)."""
    floored = token_logprobs.float().nan_to_num(nan=_LOG_FLOOR, neginf=_LOG_FLOOR).clamp_min(_LOG_FLOOR).double()
    cumulative = torch.nn.functional.pad(floored.cumsum(-1), (1, 0))  # (B, L + 1), C[:, 0] = 0
    rows = spans_rows.long()
    return (cumulative[rows, end.long()] - cumulative[rows, start.long()]).float()


# ---------------------------------------------------------------- ULD
def _sorted_l1(a_sorted: torch.Tensor, b_sorted: torch.Tensor) -> torch.Tensor:
    """Σ_i |a_i − b_i| over the last dimension, the shorter side zero-padded at the end."""
    width = max(a_sorted.shape[-1], b_sorted.shape[-1])
    a_padded = torch.nn.functional.pad(a_sorted, (0, width - a_sorted.shape[-1]))
    b_padded = torch.nn.functional.pad(b_sorted, (0, width - b_sorted.shape[-1]))
    return (a_padded - b_padded).abs().sum(-1)


def _largest(probs: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest entries of the last dimension, decreasing; zero-padded if there are fewer."""
    kept = probs.topk(min(count, probs.shape[-1]), dim=-1).values
    return torch.nn.functional.pad(kept, (0, count - kept.shape[-1]))


def uld_per_span(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ_i |sort↓(p_S)_i − sort↓(q_T)_i|: student (S, V_S), teacher (S, V_T) log-probs; returns (S,)."""
    student_sorted = student_logprobs.float().exp().sort(-1, descending=True).values
    teacher_sorted = teacher_logprobs.float().exp().sort(-1, descending=True).values
    return _sorted_l1(student_sorted, teacher_sorted)


def uld_topk_per_span(student_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """ULD against a cached top-k teacher, each side's tail as one entry: student (S, V_S), teacher
    (S, k) log-probs (any order; −inf for padded slots); returns (S,)."""
    teacher = teacher_topk_logprobs.float().exp().sort(-1, descending=True).values
    student = _largest(student_logprobs.float().exp(), teacher.shape[-1])
    teacher_tail = (1 - teacher.sum(-1, keepdim=True)).clamp_min(0)
    student_tail = (1 - student.sum(-1, keepdim=True)).clamp_min(0)
    return _sorted_l1(torch.cat([student, student_tail], -1), torch.cat([teacher, teacher_tail], -1))


def uld_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over spans of `uld_per_span`; 0 for S = 0."""
    return masked_mean(uld_per_span(student_logprobs, teacher_logprobs), None)


def uld_topk_loss(student_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over spans of `uld_topk_per_span`; 0 for S = 0."""
    return masked_mean(uld_topk_per_span(student_logprobs, teacher_topk_logprobs), None)


# ---------------------------------------------------------------- span-aligned KL
def _columns(shared: torch.Tensor, dummy: int) -> torch.Tensor:
    """Shared-string index per id, with −1 (own-vocabulary only) sent to the dummy column."""
    shared = shared.long()
    return torch.where(shared < 0, dummy, shared)


def _outcome_logprobs(span_logprob: torch.Tensor, kept_mass: torch.Tensor, *, zero_is_minus_inf: bool) -> torch.Tensor:
    """log P over [span, each column of kept_mass (S, C + 1), bucket]: (S, C + 3)."""
    bucket = (1 - span_logprob.exp() - kept_mass.sum(-1)).clamp_min(_TINY)
    shared = kept_mass.clamp_min(_TINY).log()
    if zero_is_minus_inf:  # the teacher's absent outcomes are exact zeros (0·log 0 = 0)
        shared = torch.where(kept_mass > 0, shared, -math.inf)
    return torch.cat([span_logprob.unsqueeze(-1), shared, bucket.log().unsqueeze(-1)], -1)


def span_kl_per_span(
    student_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_shared: torch.Tensor,
    teacher_shared: torch.Tensor,
    student_span_logprob: torch.Tensor,
    teacher_span_logprob: torch.Tensor,
    student_first: torch.Tensor,
    teacher_first: torch.Tensor,
    *,
    uld_weight: float = 1.0,
) -> torch.Tensor:
    """KL(teacher ‖ student) over [span, shared strings but the first tokens', bucket] plus
    uld_weight · ULD of the unmatched ids (module docstring). Shapes: student_logprobs (S, V_S);
    teacher_ids, teacher_logprobs (S, k); student_shared (V_S,), teacher_shared (V_T,) long;
    *_span_logprob (S,); *_first (S,) long token ids. Returns (S,) float32."""
    student_probs = student_logprobs.float().exp()
    teacher_probs = teacher_logprobs.float().exp()
    span_count = student_probs.shape[0]
    dummy = min(student_shared.numel(), teacher_shared.numel())
    student_columns = _columns(student_shared, dummy)
    teacher_columns = _columns(teacher_shared, dummy)
    given_columns = teacher_columns[teacher_ids.long()]  # (S, k)

    student_mass = student_probs.new_zeros(span_count, dummy + 1).scatter_add(1, student_columns.expand(span_count, -1), student_probs)
    teacher_mass = teacher_probs.new_zeros(span_count, dummy + 1).scatter_add(1, given_columns, teacher_probs)
    keep = torch.ones_like(student_mass, dtype=torch.bool)
    keep[:, dummy] = False
    keep = keep.scatter(1, teacher_columns[teacher_first.long()].unsqueeze(1), False)
    keep = keep.scatter(1, student_columns[student_first.long()].unsqueeze(1), False)

    teacher_outcomes = _outcome_logprobs(teacher_span_logprob.float(), torch.where(keep, teacher_mass, 0.0), zero_is_minus_inf=True)
    student_outcomes = _outcome_logprobs(student_span_logprob.float(), torch.where(keep, student_mass, 0.0), zero_is_minus_inf=False)
    divergence = kl_terms(teacher_outcomes, student_outcomes).sum(-1)
    if uld_weight == 0:
        return divergence

    teacher_unmatched = torch.where(given_columns == dummy, teacher_probs, 0.0).sort(-1, descending=True).values
    student_unmatched = _largest(torch.where(student_columns == dummy, student_probs, 0.0), teacher_unmatched.shape[-1])
    return divergence + uld_weight * _sorted_l1(student_unmatched, teacher_unmatched)


def span_kl_loss(*arguments, **keywords) -> torch.Tensor:
    """Mean over spans of `span_kl_per_span` (same arguments); 0 for S = 0."""
    return masked_mean(span_kl_per_span(*arguments, **keywords), None)


# ---------------------------------------------------------------- DSKD
def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension restricted to `valid` (broadcast to scores); a row with no
    valid entry gives all zeros (not NaN)."""
    valid = valid.expand_as(scores)
    any_valid = valid.any(-1, keepdim=True)
    scores = torch.where(valid, scores, -math.inf)
    return torch.softmax(torch.where(any_valid, scores, 0.0), -1) * any_valid


def _project(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """layer(inputs) in float32 whatever the layer's or the input's dtype."""
    return inputs.float() @ layer.weight.float().T


class DualSpaceDistillation(nn.Module):
    """DSKD with cross-model attention (module docstring): the learned projections and the loss terms.
    Train its parameters with the student."""

    def __init__(
        self,
        student_hidden_size: int,
        teacher_hidden_size: int,
        student_embedding_size: int,
        teacher_embedding_size: int,
        attention_size: int | None = None,
    ):
        super().__init__()
        self.attention_size = attention_size or teacher_hidden_size
        self.query = nn.Linear(2 * student_embedding_size, self.attention_size, bias=False)
        self.key = nn.Linear(2 * teacher_embedding_size, self.attention_size, bias=False)
        self.teacher_to_student = nn.Linear(teacher_hidden_size, student_hidden_size, bias=False)
        self.student_to_teacher = nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_embeddings_in: torch.Tensor,
        student_embeddings_next: torch.Tensor,
        student_mask: torch.Tensor,
        student_logits: torch.Tensor,
        student_next_ids: torch.Tensor,
        student_head: Callable[[torch.Tensor], torch.Tensor],
        teacher_hidden: torch.Tensor,
        teacher_embeddings_in: torch.Tensor,
        teacher_embeddings_next: torch.Tensor,
        teacher_mask: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_head: Callable[[torch.Tensor], torch.Tensor],
        temperature: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Shapes in the module docstring; masks (B, L) bool, student_next_ids (B, L_s) long (any
        value where masked). Each head receives float32 hidden states (a bf16 head casts them
        itself: `lambda h: lm_head(h.bfloat16())`) and its logits are used in float32. Returns float32 scalars `student_space`,
        `teacher_space`, `projector_ce` and their sum `loss`."""
        student_mask, teacher_mask = student_mask.bool(), teacher_mask.bool()
        queries = _project(self.query, torch.cat([student_embeddings_in, student_embeddings_next], -1))
        keys = _project(self.key, torch.cat([teacher_embeddings_in, teacher_embeddings_next], -1).detach())
        scores = queries @ keys.transpose(1, 2) / math.sqrt(self.attention_size)  # (B, L_s, L_t)
        to_teacher = _masked_softmax(scores, teacher_mask.unsqueeze(1))
        to_student = _masked_softmax(scores.transpose(1, 2), student_mask.unsqueeze(1))
        teacher_in_student = to_teacher @ _project(self.teacher_to_student, teacher_hidden.detach())
        student_in_teacher = to_student @ _project(self.student_to_teacher, student_hidden)

        projected_student_logits = student_head(teacher_in_student).float()
        projected_teacher_logits = teacher_head(student_in_teacher).float()
        student_counts = student_mask & teacher_mask.any(-1, keepdim=True)
        teacher_counts = teacher_mask & student_mask.any(-1, keepdim=True)

        student_space = kl_terms(log_probs(projected_student_logits.detach(), temperature), log_probs(student_logits, temperature)).sum(-1)
        teacher_space = kl_terms(log_probs(teacher_logits.detach(), temperature), log_probs(projected_teacher_logits, temperature)).sum(-1)
        next_ids = torch.where(student_counts, student_next_ids.long(), 0).unsqueeze(-1)
        projector_ce = -log_probs(projected_student_logits, 1.0).gather(-1, next_ids).squeeze(-1)
        terms = {
            "student_space": masked_mean(student_space, student_counts),
            "teacher_space": masked_mean(teacher_space, teacher_counts),
            "projector_ce": masked_mean(projector_ce, student_counts),
        }
        terms["loss"] = terms["student_space"] + terms["teacher_space"] + terms["projector_ce"]
        return terms
