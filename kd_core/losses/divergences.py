"""The divergences a student can learn full teacher logits with: one registry, by name.

Each entry names its per-position function (student log-probs (..., V), teacher log-probs
(..., V) -> (...), in the module of its own name), the keyword of its one parameter, if it has
one (β of `generalized_jsd`, α of the skew KLs; `distill.loss.divergence_parameter`), and its
closed-form value and gradient (`gradients.py`), which the fused loss uses instead of autograd.
`DistillationObjective` looks its `divergence` up here and `kd_core.config.LossConfig` checks
`distill.loss.divergence` against `DIVERGENCES`' names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from kd_core.losses.common import PerPosition
from kd_core.losses.forward_kl import forward_kl_per_position
from kd_core.losses.gradients import (
    ValueAndGradient,
    forward_kl_value_and_grad,
    generalized_jsd_value_and_grad,
    reverse_kl_value_and_grad,
    skew_forward_kl_value_and_grad,
    skew_reverse_kl_value_and_grad,
    total_variation_value_and_grad,
)
from kd_core.losses.jsd import generalized_jsd_per_position
from kd_core.losses.reverse_kl import reverse_kl_per_position
from kd_core.losses.skew_kl import skew_forward_kl_per_position, skew_reverse_kl_per_position
from kd_core.losses.total_variation import total_variation_per_position


@dataclass(frozen=True)
class Divergence:
    name: str
    per_position: PerPosition
    """(student log-probs (..., V), teacher log-probs (..., V)) -> divergence per position (...)."""
    parameter_keyword: str | None
    """The keyword of its one parameter (β or α), or None for a divergence without one."""
    closed_form: ValueAndGradient | None
    """(student log-probs, teacher log-probs, temperature) -> (value (...), ∂value/∂student logits
    (..., V)); None for a divergence without one (the fused loss then takes autograd on each chunk)."""

    def parameters(self, value: float | None) -> dict[str, float]:
        """The keyword arguments that set the parameter to `value`; none for None (the function's default)."""
        if value is None or self.parameter_keyword is None:
            return {}
        return {self.parameter_keyword: value}


DIVERGENCES: dict[str, Divergence] = {
    divergence.name: divergence
    for divergence in (
        Divergence("forward_kl", forward_kl_per_position, None, forward_kl_value_and_grad),
        Divergence("reverse_kl", reverse_kl_per_position, None, reverse_kl_value_and_grad),
        Divergence("generalized_jsd", generalized_jsd_per_position, "beta", generalized_jsd_value_and_grad),
        Divergence("skew_forward_kl", skew_forward_kl_per_position, "alpha", skew_forward_kl_value_and_grad),
        Divergence("skew_reverse_kl", skew_reverse_kl_per_position, "alpha", skew_reverse_kl_value_and_grad),
        Divergence("total_variation", total_variation_per_position, None, total_variation_value_and_grad),
    )
}
_CLOSED_FORMS = {entry.per_position: entry.closed_form for entry in DIVERGENCES.values() if entry.closed_form is not None}
"""Per-position function -> its closed form, for `closed_form`."""


def divergence_named(name: str) -> Divergence:
    """The registered divergence called `name`; ValueError naming the known ones otherwise."""
    if name not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    return DIVERGENCES[name]


def closed_form(per_position: PerPosition) -> ValueAndGradient | None:
    """The value-and-gradient function of a registered per-position divergence (plain, or a
    `partial` with its β / α as keywords), or None for any other function (autograd then takes
    its gradient)."""
    if isinstance(per_position, partial):
        found = _CLOSED_FORMS.get(per_position.func)
        return None if found is None or per_position.args else partial(found, **per_position.keywords)
    return _CLOSED_FORMS.get(per_position)

