"""Token-level divergences, sampled KL and the fused chunked LM-head loss.

Each loss is checked against a naive float64 reference written out here from its definition
(value and gradient), on odd shapes (3×47×123) with masks, for float32 and bfloat16 inputs with
per-dtype tolerances; then its properties (≥ 0, 0 on identical inputs, symmetry where it holds,
endpoint cases, an all-masked batch gives 0), and the fused version against the plain one.
Run: .venv/bin/python -m pytest tests/test_divergences.py
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch

from kd_core.losses import (
    align_vocab,
    draw_teacher_samples,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_kl,
    skew_forward_kl,
    skew_reverse_kl,
    topk_kl,
    total_variation,
)
from kd_core.losses.common import masked_mean
from kd_core.losses.forward_kl import forward_kl_per_position
from kd_core.losses.topk import topk_kl_per_position
from kd_core.losses.fused import (
    FusedTerm,
    dense_teacher_target,
    fused_lm_head_loss,
    fused_lm_head_terms,
    sampled_target,
    topk_target,
)
from kd_core.losses.divergences import DIVERGENCES, closed_form

SHAPE = (3, 47, 123)
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------- naive float64 references
def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def reference(name, p_t, p_s, parameter):
    if name == "forward_kl":
        return kl(p_t, p_s)
    if name == "reverse_kl":
        return kl(p_s, p_t)
    if name == "generalized_jsd":
        if parameter == 0:
            return kl(p_t, p_s)
        if parameter == 1:
            return kl(p_s, p_t)
        mixture = parameter * p_t + (1 - parameter) * p_s
        return parameter * kl(p_t, mixture) + (1 - parameter) * kl(p_s, mixture)
    if name == "skew_forward_kl":
        return kl(p_t, parameter * p_t + (1 - parameter) * p_s)
    if name == "skew_reverse_kl":
        return kl(p_s, parameter * p_s + (1 - parameter) * p_t)
    return 0.5 * (p_t - p_s).abs().sum(-1)


LOSSES = {
    "forward_kl": (forward_kl, None),
    "reverse_kl": (reverse_kl, None),
    "generalized_jsd": (generalized_jsd, "beta"),
    "skew_forward_kl": (skew_forward_kl, "alpha"),
    "skew_reverse_kl": (skew_reverse_kl, "alpha"),
    "total_variation": (total_variation, None),
}
CASES = [(name, value) for name in LOSSES for value in ((0.0, 0.3, 0.5, 1.0) if LOSSES[name][1] else (None,))]


def call(name, student, teacher, parameter, **kwargs):
    function, keyword = LOSSES[name]
    return function(student, teacher, **({keyword: parameter} if keyword else {}), **kwargs)


def inputs(dtype, seed=0, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    teacher = (torch.randn(shape, generator=generator) * 2).to(dtype)
    mask = torch.rand(shape[:-1], generator=generator) > 0.3
    return student, teacher, mask


# ---------------------------------------------------------------- value and gradient parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,parameter", CASES)
def test_matches_naive_reference(name, parameter, temperature, dtype):
    student, teacher, mask = inputs(dtype)
    loss = call(name, student, teacher, parameter, temperature=temperature, mask=mask)
    (gradient,) = torch.autograd.grad(loss, student)

    student64 = student.detach().double().requires_grad_()
    p_s = torch.softmax(student64 / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    expected = (reference(name, p_t, p_s, parameter) * mask).sum() / mask.sum()
    (expected_gradient,) = torch.autograd.grad(expected, student64)

    tolerance = TOLERANCES[dtype]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=tolerance, atol=tolerance * 1e-2)
    assert gradient[~mask].abs().max() == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,parameter", CASES)
def test_closed_form_gradients_equal_autograd(name, parameter, temperature):
    """The fused loss's closed-form ∂D/∂logits (`gradients.py`), in float64 against autograd on the
    same per-position function, with padded (−inf) vocabulary entries on both sides."""
    student, teacher, _ = inputs(torch.float64, seed=5, shape=(4, 7, 37))
    student, teacher = student.detach().clone(), teacher.clone()
    student[..., -3:] = teacher[..., -3:] = -math.inf
    student[0, 0] = teacher[0, 0]  # one position where the two agree: its gradient is 0
    keyword = LOSSES[name][1]
    per_position = partial(DIVERGENCES[name].per_position, **({keyword: parameter} if keyword else {}))
    student.requires_grad_()
    teacher_logprobs = torch.log_softmax(teacher / temperature, -1)
    expected = per_position(torch.log_softmax(student / temperature, -1), teacher_logprobs)
    weights = torch.rand(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), student)

    value, gradient = closed_form(per_position)(torch.log_softmax(student.detach() / temperature, -1), teacher_logprobs, temperature)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient * weights.unsqueeze(-1), expected_gradient, rtol=1e-9, atol=1e-12)
    assert gradient[..., -3:].abs().max() == 0 and torch.isfinite(gradient).all()
    assert gradient[0, 0].abs().max() < 1e-12
    assert gradient[1, 0].abs().max() > 1e-3 or (name.startswith("skew") and parameter == 1.0)  # α = 1: D ≡ 0


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("name,parameter", CASES)
def test_nonnegative_and_zero_exactly_on_identical_inputs(name, parameter):
    student, teacher, _ = inputs(torch.float32, seed=1)
    assert call(name, student, teacher, parameter) > 0 or (name.startswith("skew") and parameter == 1.0)
    same = call(name, teacher, teacher.clone(), parameter)
    assert same.abs() < 1e-6


@pytest.mark.parametrize("name,parameter", CASES)
def test_all_masked_batch_gives_zero_and_zero_gradient(name, parameter):
    student, teacher, _ = inputs(torch.float32, seed=2, shape=(2, 5, 11))
    loss = call(name, student, teacher, parameter, mask=torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max() == 0


def test_symmetric_divergences_are_symmetric():
    a, b, _ = inputs(torch.float32, seed=3)
    a = a.detach()
    torch.testing.assert_close(generalized_jsd(a, b, beta=0.5), generalized_jsd(b, a, beta=0.5))
    torch.testing.assert_close(total_variation(a, b), total_variation(b, a))
    assert not torch.allclose(forward_kl(a, b), forward_kl(b, a))


def test_endpoints_equal_the_simpler_losses():
    student, teacher, mask = inputs(torch.float32, seed=4)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0, mask=mask), forward_kl(student, teacher, mask=mask))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0, mask=mask), reverse_kl(student, teacher, mask=mask))
    torch.testing.assert_close(skew_forward_kl(student, teacher, alpha=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=0.0), reverse_kl(student, teacher))
    assert skew_forward_kl(student, teacher, alpha=1.0).abs() < 1e-7


def test_symmetric_jsd_is_bounded_by_log_2_and_tv_by_1():
    student = torch.tensor([[100.0, -100.0]])
    teacher = torch.tensor([[-100.0, 100.0]])
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(math.log(2), rel=1e-5)
    assert total_variation(student, teacher).item() == pytest.approx(1.0, rel=1e-6)


def test_pinned_values():
    # p_t = (0.5, 0.5), p_s = (0.25, 0.75): KL(p_t||p_s) = 0.5 ln 2 + 0.5 ln(2/3); TV = 0.25
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    assert forward_kl(student, teacher).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    assert total_variation(student, teacher).item() == pytest.approx(0.25, rel=1e-6)


def test_minus_infinity_padding_is_harmless():
    student, teacher, mask = inputs(torch.float32, seed=5, shape=(2, 9, 20))
    padded_student = torch.cat([student, torch.full((2, 9, 4), float("-inf"))], -1)
    padded_teacher = torch.cat([teacher, torch.full((2, 9, 4), float("-inf"))], -1)
    for name, parameter in CASES:
        plain = call(name, student, teacher, parameter, mask=mask)
        padded = call(name, padded_student, padded_teacher, parameter, mask=mask)
        assert torch.isfinite(padded), name
        torch.testing.assert_close(padded, plain)
        (gradient,) = torch.autograd.grad(padded, student)
        assert torch.isfinite(gradient).all(), name


def test_padded_teacher_vocabulary_is_aligned_explicitly():
    student, teacher, _ = inputs(torch.float32, seed=6, shape=(2, 3, 120))
    padded_teacher = torch.cat([teacher, torch.randn(2, 3, 8)], -1)  # 128 logits for a 120-token vocabulary
    with pytest.raises(ValueError, match="student has 120 logits per position but the teacher has 128; .*vocab_size"):
        forward_kl(student, padded_teacher)
    torch.testing.assert_close(forward_kl(student, padded_teacher, vocab_size=120), forward_kl(student, teacher))
    with pytest.raises(ValueError, match="vocab_size=130 exceeds"):
        align_vocab(student, padded_teacher, vocab_size=130)


# ---------------------------------------------------------------- sampled KL
@pytest.mark.slow
def test_sampled_kl_gradient_is_unbiased_and_loss_converges():
    generator = torch.Generator().manual_seed(7)
    teacher = torch.randn(4, 30, generator=generator) * 2
    student = torch.randn(4, 30, generator=generator, requires_grad=True)
    exact = forward_kl(student, teacher)
    (exact_gradient,) = torch.autograd.grad(exact, student)

    def estimate(draws: int, repeats: int):
        losses, gradients = [], []
        for _ in range(repeats):
            ids, counts = draw_teacher_samples(teacher, draws, generator=generator)
            loss = sampled_kl(student, ids, counts)
            losses.append(loss.detach())
            gradients.append(torch.autograd.grad(loss, student)[0])
        return torch.stack(losses), torch.stack(gradients)

    _, few = estimate(draws=4, repeats=4000)  # 4 draws per position: noisy, but unbiased
    assert (few.mean(0) - exact_gradient).abs().max() < 0.01
    assert (few[0] - exact_gradient).abs().max() > 0.02  # a single estimate really is noisy
    many_losses, _ = estimate(draws=20000, repeats=1)
    assert many_losses[0].item() == pytest.approx(exact.item(), abs=0.01)


def test_drawn_samples_are_unique_ids_with_counts():
    teacher = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    ids, counts = draw_teacher_samples(teacher, 12, generator=torch.Generator().manual_seed(0))
    assert counts.sum().item() == 12 and set(ids[counts > 0].tolist()) <= {0, 1}
    assert len(set(ids[counts > 0].tolist())) == int((counts > 0).sum())
    again = draw_teacher_samples(teacher, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids) and torch.equal(again[1], counts)


# ---------------------------------------------------------------- fused chunked LM head
def lm_head(dtype, seed=8, rows=47, hidden=16, vocab=123, teacher_hidden=24):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=generator) * 0.5).to(dtype).requires_grad_()
    teacher_hidden_states = torch.randn(rows, teacher_hidden, generator=generator).to(dtype)
    teacher_weight = (torch.randn(vocab, teacher_hidden, generator=generator) * 0.5).to(dtype)
    mask = torch.rand(rows, generator=generator) > 0.3
    return student_hidden, student_weight, teacher_hidden_states, teacher_weight, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,parameter", [("forward_kl", None), ("reverse_kl", None), ("generalized_jsd", 0.5),
                                            ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.1), ("total_variation", None)])
def test_fused_matches_unfused(name, parameter, dtype):
    hidden, weight, teacher_hidden, teacher_weight, mask = lm_head(dtype)
    keyword = LOSSES[name][1]
    per_position = partial(DIVERGENCES[name].per_position, **({keyword: parameter} if keyword else {}))
    target = dense_teacher_target(per_position, teacher_hidden, teacher_weight, temperature=2.0)
    fused = fused_lm_head_loss(hidden, weight, target, mask=mask, chunk_size=10)
    fused_gradients = torch.autograd.grad(fused, (hidden, weight))
    plain = call(name, hidden @ weight.T, teacher_hidden @ teacher_weight.T, parameter, temperature=2.0, mask=mask)
    plain_gradients = torch.autograd.grad(plain, (hidden, weight))
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(fused, plain, rtol=tolerance, atol=tolerance)
    for got, expected in zip(fused_gradients, plain_gradients):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance * 10, atol=tolerance)


def test_fused_sparse_targets_match_unfused():
    hidden, weight, teacher_hidden, teacher_weight, mask = lm_head(torch.float32, seed=9)
    teacher_logits = teacher_hidden @ teacher_weight.T
    top = torch.log_softmax(teacher_logits, -1).topk(7, dim=-1)
    ids, counts = draw_teacher_samples(teacher_logits, 12, generator=torch.Generator().manual_seed(0))
    for target, plain in (
        (topk_target(top.values, top.indices), lambda logits: topk_kl(logits, top.values, top.indices, mask=mask)),
        (sampled_target(ids, counts), lambda logits: sampled_kl(logits, ids, counts, mask=mask)),
    ):
        fused = fused_lm_head_loss(hidden, weight, target, mask=mask, chunk_size=8)
        expected = plain(hidden @ weight.T)
        torch.testing.assert_close(fused, expected)
        for got, want in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fused_gradient_accumulation_is_invariant_to_micro_batching():
    """One batch of 8 rows, and 8 micro-batches of 1, normalised by the global valid count."""
    hidden, weight, teacher_hidden, teacher_weight, mask = lm_head(torch.float32, seed=10, rows=8)
    mask[3] = False
    target = partial(dense_teacher_target, forward_kl_per_position)
    whole = fused_lm_head_loss(hidden, weight, target(teacher_hidden, teacher_weight), mask=mask, chunk_size=3)
    whole_gradient = torch.autograd.grad(whole, weight)[0]
    accumulated = torch.zeros_like(weight)
    valid = float(mask.sum())
    for row in range(8):
        rows = slice(row, row + 1)
        part = fused_lm_head_loss(
            hidden[rows], weight, target(teacher_hidden[rows], teacher_weight), mask=mask[rows], num_valid_tokens=valid
        )
        accumulated += torch.autograd.grad(part, weight)[0]
    torch.testing.assert_close(accumulated, whole_gradient, rtol=1e-5, atol=1e-7)


def test_fused_terms_share_one_pass_and_a_zero_weight_term_is_only_logged():
    hidden, weight, teacher_hidden, teacher_weight, mask = lm_head(torch.float32, seed=12)
    kd = FusedTerm(dense_teacher_target(forward_kl_per_position, teacher_hidden, teacher_weight), mask, weight=0.7)
    tokens = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=torch.Generator().manual_seed(0))
    ce = FusedTerm(lambda logits, rows: torch.nn.functional.cross_entropy(logits, tokens[rows], reduction="none"), weight=0.0)
    total, values = fused_lm_head_terms(hidden, weight, {"ce": ce, "kd": kd}, chunk_size=9)
    plain_ce = torch.nn.functional.cross_entropy(hidden @ weight.T, tokens)
    plain_kd = forward_kl(hidden @ weight.T, teacher_hidden @ teacher_weight.T, mask=mask)
    torch.testing.assert_close(values["ce"], plain_ce.detach())
    torch.testing.assert_close(values["kd"], plain_kd.detach())
    torch.testing.assert_close(total, 0.7 * plain_kd.detach())
    for got, want in zip(torch.autograd.grad(total, (hidden, weight)), torch.autograd.grad(0.7 * plain_kd, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    kd.weight = 0.0  # nothing to train on: zero gradients, values still logged
    total, values = fused_lm_head_terms(hidden, weight, {"ce": ce, "kd": kd}, chunk_size=9)
    assert total.item() == 0 and all(g.abs().max() == 0 for g in torch.autograd.grad(total, (hidden, weight)))
    torch.testing.assert_close(values["kd"], plain_kd.detach())


def test_fused_all_masked_is_zero_not_nan():
    hidden, weight, teacher_hidden, teacher_weight, _ = lm_head(torch.float32, seed=11, rows=5)
    target = dense_teacher_target(forward_kl_per_position, teacher_hidden, teacher_weight)
    loss = fused_lm_head_loss(hidden, weight, target, mask=torch.zeros(5, dtype=torch.bool))
    gradients = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in gradients)


def test_the_config_knows_every_registered_divergence_by_name_without_importing_torch():
    import subprocess
    import sys

    from kd_core.config import DIVERGENCE_NAMES

    assert DIVERGENCE_NAMES == tuple(DIVERGENCES)
    loads = "import sys; from kd_core.job import load_config; load_config('configs/demo.yaml'); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, check=True, cwd=__file__.rsplit("/tests/", 1)[0])
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------ on-policy: policy gradient
def test_the_policy_gradient_loss_equals_its_float64_formula_in_value_and_gradient():
    from kd_core.losses.policy_gradient import policy_gradient_reverse_kl, reported_kl

    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 7, generator=generator) - 2).requires_grad_(True)
    sampler, teacher = torch.randn(3, 7, generator=generator) - 2, torch.randn(3, 7, generator=generator) - 2
    mask = torch.rand(3, 7, generator=generator) > 0.3
    teacher[~mask] = -math.inf  # a masked token's value must not leak in as NaN
    loss = policy_gradient_reverse_kl(student.bfloat16(), sampler, teacher, mask=mask)  # float32 math whatever the input dtype
    assert loss.dtype == torch.float32
    loss = policy_gradient_reverse_kl(student, sampler, teacher, mask=mask)
    (gradient,) = torch.autograd.grad(loss, student)
    s, q, t, m = student.detach().double(), sampler.double(), teacher.double(), mask.double()
    advantage = torch.where(mask, t - q, 0.0)
    expected = -(torch.exp(s - q) * advantage * m).sum() / m.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient.double(), -(torch.exp(s - q) * advantage * m) / m.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reported_kl(sampler, teacher, mask).double(), -(advantage * m).sum() / m.sum(), rtol=1e-6, atol=1e-7)
    none = policy_gradient_reverse_kl(student, sampler, teacher, mask=torch.zeros_like(mask))
    assert float(none.detach()) == 0.0 and not torch.isnan(torch.autograd.grad(none, student)[0]).any()


def test_the_sampled_policy_gradient_follows_the_reverse_kl_gradient_in_expectation():
    """Tokens drawn from the student itself (a fresh sampler): the mean policy gradient over many
    draws approaches the exact gradient of KL(p_student ‖ p_teacher) with respect to the
    student's logits, computed in float64."""
    from kd_core.losses.policy_gradient import policy_gradient_reverse_kl, sampled_token_logprobs

    generator = torch.Generator().manual_seed(1)
    student_logits = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    teacher_logits = torch.randn(2, 6, generator=generator, dtype=torch.float64) * 2
    exact_logits = student_logits.clone().requires_grad_(True)
    p, log_t = torch.log_softmax(exact_logits, -1), torch.log_softmax(teacher_logits, -1)
    (exact,) = torch.autograd.grad((p.exp() * (p - log_t)).sum(), exact_logits)  # each position's own KL gradient
    draws = 200_000
    tokens = torch.multinomial(torch.softmax(student_logits, -1), draws, replacement=True, generator=generator).T  # (draws, 2)
    logits = student_logits.float().expand(draws, 2, 6).clone().requires_grad_(True)
    student = sampled_token_logprobs(logits, tokens)
    loss = policy_gradient_reverse_kl(student, student.detach(), sampled_token_logprobs(teacher_logits.expand(draws, 2, 6), tokens))
    (gradient,) = torch.autograd.grad(loss, logits)
    estimate = gradient.sum(0).double() * 2  # each position's share of the mean over 2·draws tokens, summed over draws
    torch.testing.assert_close(estimate, exact, rtol=0, atol=0.01)


# ---------------------------------------------------------------- divergences over the teacher's top k
@pytest.mark.parametrize("name,parameter", [case for case in CASES if case[1] in (None, 0.3)])
def test_a_divergence_over_top_k_targets_is_the_divergence_of_the_k_plus_tail_distributions(name, parameter):
    """The objective on top-k targets (an on-policy teacher's `teacher_top_k`, a top-k cache) against
    the float64 divergence of the two distributions over the k ids and one bucket for the rest."""
    from kd_core.losses import DistillationObjective, TeacherTargets

    student, teacher, mask = inputs(torch.float32, seed=3)
    k, temperature = 7, 2.0
    targets = TeacherTargets(logits=teacher).top_k(k, temperature)
    objective = DistillationObjective(ce_weight=0.0, kd_weight=1.0, temperature=temperature, divergence=name, divergence_parameter=parameter)
    ours = objective(student, torch.zeros(SHAPE[:2], dtype=torch.long), dataclasses.replace(targets, mask=mask))["kd"]
    p_all = torch.softmax(teacher.double() / temperature, -1)
    q_all = torch.softmax(student.detach().double() / temperature, -1)
    ids = p_all.topk(k, -1).indices
    p_head, q_head = p_all.gather(-1, ids), q_all.gather(-1, ids)
    p = torch.cat([p_head, 1 - p_head.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1)
    per_position = reference(name, p, q, 0.1 if name.startswith("skew") and parameter is None else parameter)
    torch.testing.assert_close(ours.double(), per_position[mask].mean(), rtol=1e-5, atol=1e-6)
    # The gradient too, against float64 autograd through the same k + 1 outcomes.
    (gradient,) = torch.autograd.grad(ours, student)
    exact = student.detach().double().requires_grad_()
    q_exact = torch.softmax(exact / temperature, -1)
    q_head_exact = q_exact.gather(-1, ids)
    q_full = torch.cat([q_head_exact, 1 - q_head_exact.sum(-1, keepdim=True)], -1)
    reference(name, p, q_full, 0.1 if name.startswith("skew") and parameter is None else parameter)[mask].mean().backward()
    torch.testing.assert_close(gradient.double(), exact.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_over_the_whole_vocabulary_the_top_k_divergence_is_the_dense_one(name, temperature):
    from kd_core.losses import DistillationObjective, TeacherTargets

    student, teacher, mask = inputs(torch.float32, seed=4)
    labels = torch.zeros(SHAPE[:2], dtype=torch.long)
    dense = TeacherTargets(logits=teacher, mask=mask)
    every = dataclasses.replace(TeacherTargets(logits=teacher).top_k(SHAPE[-1], temperature), mask=mask)
    objective = DistillationObjective(ce_weight=0.0, kd_weight=1.0, divergence=name, temperature=temperature)
    torch.testing.assert_close(objective(student, labels, every)["kd"], objective(student, labels, dense)["kd"], rtol=1e-4, atol=1e-5)


def test_forward_kl_over_top_k_keeps_its_tail_form_and_other_divergences_need_the_tail():
    from kd_core.losses import DistillationObjective, TeacherTargets

    student, teacher, mask = inputs(torch.float32, seed=4)
    labels = torch.zeros(SHAPE[:2], dtype=torch.long)
    few = dataclasses.replace(TeacherTargets(logits=teacher).top_k(5, 1.0), mask=mask)
    forward = DistillationObjective(ce_weight=0.0, kd_weight=1.0, divergence="forward_kl")
    expected = masked_mean(topk_kl_per_position(torch.log_softmax(student, -1), few.topk_logprobs, few.topk_ids), mask)
    torch.testing.assert_close(forward(student, labels, few)["kd"], expected)
    with pytest.raises(ValueError, match="set topk_tail"):
        DistillationObjective(ce_weight=0.0, kd_weight=1.0, divergence="reverse_kl", topk_tail=False)(student, labels, few)
