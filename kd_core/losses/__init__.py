"""Distillation losses. Each divergence is a pure function in its own module; see the modules'
docstrings for the formulas and tensor shapes."""

from kd_core.losses.objective import DistillationObjective, next_token_cross_entropy
from kd_core.losses.topk import masked_mean, topk_kl

__all__ = ["DistillationObjective", "masked_mean", "next_token_cross_entropy", "topk_kl"]
