"""Distillation losses. Each divergence is a pure function in its own module, with its formula and
tensor shapes in the module docstring; `fused.py` computes any of them chunk by chunk from hidden
states and output weights without materialising the full logits (`fused_lm_head_terms`: several
weighted terms in one pass), with the closed-form gradients of `gradients.py` for dense targets.

Token-level divergences on logits (..., V), float32 at temperature T, masked mean:
    forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, skew_reverse_kl, total_variation
    (registered by name, with their parameter and closed-form gradient, in divergences.py:
    DIVERGENCES)
Teacher targets: TeacherTargets (targets.py), what DistillationObjective and RewardObjective take;
    TeacherMix, several teachers' targets for one batch (routed or weighted)
Sparse targets from a teacher cache:
    topk_kl (top-k ids and log-probs, optional tail bucket), sampled_kl (Random-Sampling KD)
On-policy (the student's own samples, scored by the teacher):
    policy_gradient_reverse_kl, reported_kl, sampled_token_logprobs (policy_gradient.py)
Cross-tokenizer: AlignedSpans, span_logprobs, uld_loss, uld_topk_loss, span_kl_loss, DualSpaceDistillation
Features and structure:
    hidden_mse, hidden_cosine, HiddenStateDistillation (features.py); rkd_distance, rkd_angle,
    similarity_kl (relational.py); matryoshka_distillation; reward_mse, preference_kl, bradley_terry,
    RewardObjective (reward.py)
"""

from kd_core.losses.common import align_vocab, masked_mean
from kd_core.losses.cross_tokenizer import (
    AlignedSpans,
    DualSpaceDistillation,
    span_kl_loss,
    span_logprobs,
    uld_loss,
    uld_topk_loss,
)
from kd_core.losses.divergences import DIVERGENCES, Divergence
from kd_core.losses.features import HiddenStateDistillation, hidden_cosine, hidden_mse
from kd_core.losses.forward_kl import forward_kl
from kd_core.losses.fused import (
    FusedTerm,
    dense_teacher_target,
    fused_lm_head_loss,
    fused_lm_head_terms,
    sampled_target,
    topk_target,
)
from kd_core.losses.jsd import generalized_jsd
from kd_core.losses.matryoshka import matryoshka_distillation
from kd_core.losses.objective import DistillationObjective, next_token_cross_entropy
from kd_core.losses.policy_gradient import policy_gradient_reverse_kl, reported_kl, sampled_token_logprobs
from kd_core.losses.relational import rkd_angle, rkd_distance, similarity_kl
from kd_core.losses.reverse_kl import reverse_kl
from kd_core.losses.reward import RewardObjective, bradley_terry, preference_kl, reward_mse
from kd_core.losses.sampled import draw_teacher_samples, sampled_kl
from kd_core.losses.skew_kl import skew_forward_kl, skew_reverse_kl
from kd_core.losses.targets import TeacherMix, TeacherTargets
from kd_core.losses.topk import topk_kl
from kd_core.losses.total_variation import total_variation

__all__ = [
    "AlignedSpans",
    "DIVERGENCES",
    "DualSpaceDistillation",
    "DistillationObjective",
    "Divergence",
    "FusedTerm",
    "HiddenStateDistillation",
    "RewardObjective",
    "TeacherMix",
    "TeacherTargets",
    "align_vocab",
    "bradley_terry",
    "dense_teacher_target",
    "draw_teacher_samples",
    "forward_kl",
    "fused_lm_head_loss",
    "fused_lm_head_terms",
    "generalized_jsd",
    "hidden_cosine",
    "hidden_mse",
    "masked_mean",
    "matryoshka_distillation",
    "next_token_cross_entropy",
    "policy_gradient_reverse_kl",
    "preference_kl",
    "reported_kl",
    "reverse_kl",
    "reward_mse",
    "rkd_angle",
    "rkd_distance",
    "sampled_kl",
    "sampled_token_logprobs",
    "sampled_target",
    "similarity_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "span_kl_loss",
    "span_logprobs",
    "topk_kl",
    "topk_target",
    "total_variation",
    "uld_loss",
    "uld_topk_loss",
]
